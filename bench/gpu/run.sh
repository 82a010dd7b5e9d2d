#!/usr/bin/env bash
# kvbm inside real vLLM on a CUDA machine: versions, correctness, transfer bandwidth, performance.
#
#   bench/gpu/run.sh OUT_DIR [smoke|full]
#
# `smoke`: versions, the correctness suite and a short vllm-vs-kvbm serve run (minutes);
# `full`: versions, correctness, bench/transfer.py and bench/gpu/perf.sh (the table in docs/gpu-vllm.md).
# On the lent H200, vLLM itself comes from ../shared/device-vllm (see docs/gpu-vllm.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: run.sh OUT_DIR [smoke|full]}
mode=${2:-full}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export KVBM_MODEL_CACHE=${KVBM_MODEL_CACHE:-/tmp/kvbm-models}
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

stamp versions | tee "$out/versions.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, vllm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'vllm', vllm.__version__)"
  python3 -c "import kvbm.vllm_integration.connector as c; print('import kvbm.vllm_integration.connector: ok;', c.VLLM)"
  python3 -m kvbm doctor --cpu-cache-gb 8 2>&1 | tail -n 20
} 2>&1 | tee -a "$out/versions.txt"

stamp correctness | tee "$out/correctness.txt"
python3 bench/gpu/correctness.py --out /tmp/gpu-correctness 2>&1 | tail -n 40 | tee -a "$out/correctness.txt"

if [ "$mode" = full ]; then
  stamp transfer | tee "$out/transfer.txt"
  python3 bench/transfer.py 2>&1 | tail -n 40 | tee -a "$out/transfer.txt"
  stamp perf | tee "$out/perf.txt"
  bench/gpu/perf.sh /tmp/gpu-perf 2>&1 | grep -v "^INFO\|^DEBUG" | tail -n 80 | tee -a "$out/perf.txt"
else
  stamp perf-smoke | tee "$out/perf.txt"
  REUSE="vllm kvbm-host" NO_REUSE="" bench/gpu/perf.sh /tmp/gpu-perf --time 20 --num-users 4 --chat-history 4000 2>&1 \
    | grep -v "^INFO\|^DEBUG" | tail -n 60 | tee -a "$out/perf.txt"
fi
stamp done | tee -a "$out/perf.txt"
# Logs of every engine and server, for what went wrong (one file: at most 8 come back).
tar -czf "$out/logs.tgz" /tmp/gpu-correctness/*.log /tmp/gpu-correctness/*.json /tmp/gpu-perf 2>/dev/null || true
