#!/usr/bin/env bash
# kvbm inside real vLLM on a CUDA machine: versions, correctness, transfer bandwidth, performance.
#
#   bench/gpu/run.sh OUT_DIR check        versions, imports, kvbm doctor
#   bench/gpu/run.sh OUT_DIR gpu-tests    pytest -m gpu tests/test_gpu_transfer.py tests/test_gpu_executor.py
#   bench/gpu/run.sh OUT_DIR correctness  bench/gpu/correctness.py (engines side by side, minutes)
#   bench/gpu/run.sh OUT_DIR models       the same for the gpu-swa (sliding window), gpu-mla (MLA) and gpu-mamba presets,
#                                         and the gpu preset with an EAGLE draft head (speculative decoding)
#   bench/gpu/run.sh OUT_DIR transfer     bench/transfer.py (G1<->G2 copy engine against memcpy)
#   bench/gpu/run.sh OUT_DIR perf-start   bench/gpu/perf.sh in the background (its own session)
#   bench/gpu/run.sh OUT_DIR perf-hybrid-start   the same table for llama8b-swa-shape (sliding window + full)
#   bench/gpu/run.sh OUT_DIR perf-wait [SECONDS]   wait for it (at most SECONDS), copy its table
#   bench/gpu/run.sh OUT_DIR all          check, correctness, transfer, then perf in the foreground
#
# On the lent H200 (where one command may run 10 minutes), perf runs in the background and later
# calls wait for it; elsewhere `all` does everything in one go. docs/gpu-vllm.md has the results.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: run.sh OUT_DIR STAGE...}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export KVBM_MODEL_CACHE=${KVBM_MODEL_CACHE:-/tmp/kvbm-models}
work=${KVBM_GPU_WORK:-/tmp/kvbm-gpu}
mkdir -p "$work"
t0=$(date +%s)
stamp() { echo "== $1 ($(date -u +%H:%M:%S), +$(( $(date +%s) - t0 )) s)"; }

check() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, vllm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'vllm', vllm.__version__)"
  python3 -c "import kvbm.vllm_integration.connector as c; print('import kvbm.vllm_integration.connector: ok;', c.VLLM)"
  python3 -c "import vllm.entrypoints.openai.api_server" && echo "vllm serve imports: ok"
  python3 -m kvbm doctor --cpu-cache-gb 34.36 --disk-cache-gb 20 --disk-cache-dir /tmp/kvbm-g3 2>&1 | tail -n 20
}
perf_background() {  # bench/gpu/perf.sh into $work/$1 in its own session; perf-wait waits for it
  rm -f "$work/perf.done"
  setsid nohup bash -c "bench/gpu/perf.sh '$work/$1'; echo \"rc=\$? \$(date -u +%H:%M:%S)\" > '$work/perf.done'" \
    > "$work/perf.log" 2>&1 < /dev/null &
  echo "perf running in the background: $work/perf.log"
}
perf_wait() {
  local limit=${1:-540} waited=0
  while [ ! -f "$work/perf.done" ] && [ "$waited" -lt "$limit" ]; do sleep 10; waited=$((waited + 10)); done
  grep -v "^INFO\|^DEBUG\|^\[" "$work/perf.log" | tail -n 90
  [ -f "$work/perf.done" ] && echo "perf finished: $(cat "$work/perf.done")" || echo "perf still running"
}

while [ $# -gt 0 ]; do
  stage=$1; shift
  case $stage in
    check) stamp check; check 2>&1 | tee -a "$out/check.txt" ;;
    gpu-tests)  # the CUDA copy engine on every cache layout, byte for byte
      stamp gpu-tests | tee -a "$out/check.txt"
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_transfer.py tests/test_gpu_executor.py 2>&1 | tail -n 15 | tee -a "$out/check.txt" ;;
    correctness)
      stamp correctness | tee -a "$out/correctness.txt"
      python3 bench/gpu/correctness.py --out "$work/correctness" 2>&1 | tail -n 40 | tee -a "$out/correctness.txt" ;;
    models)  # hybrid (sliding window + full, vLLM's hybrid manager) and MLA models against their oracles, side by side
      stamp models | tee -a "$out/models.txt"
      cfg=oracle-eager,oracle-graphs,kvbm-host-eager,kvbm-host-graphs
      python3 bench/gpu/correctness.py --preset gpu-swa --out "$work/models-swa" --configs "$cfg" \
        ${KVBM_MODELS_TIMEOUT:+--timeout "$KVBM_MODELS_TIMEOUT"} > "$work/swa.txt" 2>&1 &
      python3 bench/gpu/correctness.py --preset gpu-mla --out "$work/models-mla" --configs "$cfg,oracle-graphs-again" \
        ${KVBM_MODELS_TIMEOUT:+--timeout "$KVBM_MODELS_TIMEOUT"} > "$work/mla.txt" 2>&1 &
      # vLLM raises a Mamba hybrid's block size until an attention page holds a Mamba state (48 tokens here);
      # one-block prefill chunks keep vLLM's chunking (and so the bf16 scan's rounding) alike in every run.
      python3 bench/gpu/correctness.py --preset gpu-mamba --block 48 --max-num-batched-tokens 48 \
        --out "$work/models-mamba" --configs "$cfg,vllm-small-eager,kvbm-host+disk-eager" \
        ${KVBM_MODELS_TIMEOUT:+--timeout "$KVBM_MODELS_TIMEOUT"} > "$work/mamba.txt" 2>&1 &
      python3 bench/gpu/correctness.py --preset gpu --eagle 2 --out "$work/models-eagle" --configs "$cfg" \
        ${KVBM_MODELS_TIMEOUT:+--timeout "$KVBM_MODELS_TIMEOUT"} > "$work/eagle.txt" 2>&1 &
      wait
      tail -n 20 "$work/swa.txt" "$work/mla.txt" "$work/mamba.txt" "$work/eagle.txt" | tee -a "$out/models.txt" ;;
    transfer)
      stamp transfer | tee -a "$out/transfer.txt"
      python3 bench/transfer.py 2>&1 | tail -n 40 | tee -a "$out/transfer.txt" ;;
    perf-start) stamp perf-start; perf_background perf ;;
    perf-hybrid-start)
      stamp perf-hybrid-start
      PRESET=llama8b-swa-shape GPU_BLOCKS=8400 FLOOR_BLOCKS=60000 NO_REUSE= \
        REUSE="${REUSE:-vllm vllm-offload kvbm-host floor}" perf_background perf-hybrid ;;
    perf-wait)
      limit=540; if [[ ${1:-} =~ ^[0-9]+$ ]]; then limit=$1; shift; fi
      stamp perf-wait; perf_wait "$limit" 2>&1 | tee "$out/perf.txt" ;;
    all) set -- check correctness transfer perf "$@" ;;
    perf) stamp perf; bench/gpu/perf.sh "$work/perf" 2>&1 | grep -v "^INFO\|^DEBUG" | tail -n 90 | tee "$out/perf.txt" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
# Engine and server logs and the runs' JSON, for what went wrong (one file: few come back).
tar -czf "$out/logs.tgz" -C "$work" --exclude='*.spec.json' --exclude='vllm-cache' --exclude='disk' --exclude='*.g3' . 2>/dev/null || true
stamp done
