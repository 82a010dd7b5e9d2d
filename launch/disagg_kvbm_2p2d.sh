#!/usr/bin/env bash
# Disaggregated serving, 2P2D: two prefill workers with kvbm + NIXL (PREFILL_GPUS ["0 1"]),
# two decode workers with NIXL (DECODE_GPUS ["2 3"]) and kvbm's router on HTTP_PORT (8000),
# which keeps each conversation on one prefill worker (its kvbm has the prefix).
# CPU_ONLY=1 runs it on vLLM's CPU backend. More settings: launch/common.sh.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run_disagg "${PREFILL_GPUS:-0 1}" "${DECODE_GPUS:-2 3}"
