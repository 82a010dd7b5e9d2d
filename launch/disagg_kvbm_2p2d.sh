#!/usr/bin/env bash
# Disaggregated serving, 2P2D: two prefill workers with kvbm + NIXL (PREFILL_GPUS ["0 1"]),
# two decode workers with NIXL (DECODE_GPUS ["2 3"]) and a router on HTTP_PORT (8000) that keeps each
# conversation on the prefill worker whose kvbm has the prefix: Dynamo's frontend (--router-mode kv, fed
# kvbm's G2/G3 events) when Dynamo is installed, else kvbm's router.
# CPU_ONLY=1 runs it on vLLM's CPU backend. More settings: launch/common.sh.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run_disagg "${PREFILL_GPUS:-0 1}" "${DECODE_GPUS:-2 3}"
