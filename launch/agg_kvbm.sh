#!/usr/bin/env bash
# Aggregated serving on HTTP_PORT (8000), host tier DYN_KVBM_CPU_CACHE_GB=20 per worker.
# With NVIDIA Dynamo installed (scripts/setup_dynamo.sh): Dynamo's frontend (--router-mode kv) and one
# `dynamo.vllm` worker with kvbm per GPU of AGG_GPUS [0]. Without it: one vLLM worker with kvbm (AGG_GPU [0]).
# CPU_ONLY=1 runs it on vLLM's CPU backend. More settings: launch/common.sh.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [ "$DYNAMO" = 1 ]; then
  run_agg "${AGG_GPUS:-${AGG_GPU:-0}}"
fi
WORKER_HOST=$HTTP_HOST
start_worker agg agg "${AGG_GPU:-0}" "$HTTP_PORT"
log "1 aggregated worker of $MODEL; OpenAI API at http://$HTTP_HOST:$HTTP_PORT/v1 once /health answers 200"
wait_any
