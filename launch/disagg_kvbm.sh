#!/usr/bin/env bash
# Disaggregated serving, 1P1D: a prefill worker with kvbm + NIXL (PREFILL_GPUS [0]),
# a decode worker with NIXL (DECODE_GPUS [1]) and a router on HTTP_PORT (8000): Dynamo's frontend
# (--router-mode kv; the prefill worker's connector is PdConnector) when Dynamo is installed, else kvbm's router.
# CPU_ONLY=1 runs it on vLLM's CPU backend. More settings: launch/common.sh.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run_disagg "${PREFILL_GPUS:-0}" "${DECODE_GPUS:-1}"
