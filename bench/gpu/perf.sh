#!/usr/bin/env bash
# GPU performance, one run, one table: LMBenchmark-shaped multi-round QA through `vllm serve` on a
# Llama-3.1-8B-shaped model (bf16, random weights from vLLM's dummy loader), vLLM's GPU pool shrunk so
# the users' working set is >= 4x it. Configurations, one after another on the same GPU:
#   vllm            vLLM alone (its own prefix cache, small pool)
#   vllm-offload    + vLLM's native OffloadingConnector with the same host memory as kvbm (32 GiB)
#   kvbm-host       + kvbm, G2 = 32 GiB pinned host memory, in-step loads whole (the forward waits for all)
#   kvbm-host-layer + the same, in-step loads layer by layer (DYN_KVBM_LAYERWISE_LOADS=on)
#   kvbm-host+disk  + kvbm, G2 = 32 GiB and G3 = 20 GB on local disk
#   floor           vLLM alone with a pool large enough for everything
# then a no-reuse workload (every prompt new) for vllm vs kvbm-host: what kvbm costs when it cannot help.
#
#   bench/gpu/perf.sh OUT_DIR [kvbm bench compare options]     (on a CUDA machine with vLLM installed)
#   REUSE="vllm kvbm-host" NO_REUSE= bench/gpu/perf.sh OUT_DIR --time 20   (a subset)
#   PRESET=llama8b-swa-shape GPU_BLOCKS=2500 FLOOR_BLOCKS=60000 bench/gpu/perf.sh OUT_DIR
#       the hybrid model (Gemma 3's 5:1 sliding-window pattern on the 8B shape; run.sh perf-hybrid).
#       vLLM's hybrid manager pages 5 layers per block there, so 2,500 blocks are 0.22x the GPU bytes of
#       the Llama run's 1,800 and still hold one 24,576-token request (1,536 full + 6 x 65 window blocks).
# The default lists fit about 8 minutes of GPU time less than they used to; kvbm-host+disk and
# vllm-offload (measured in docs/gpu-vllm.md) run when named in REUSE.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: perf.sh OUT_DIR [kvbm bench compare options]}; shift
PY=${PYTHON:-python3}
model=$("$PY" -m kvbm.tools.demo.tiny_model --preset "${PRESET:-llama8b-shape}")
gib32=34.36  # 32 GiB in GB (kvbm counts GB = 1e9 bytes; vLLM's --kv-offloading-size counts GiB)
engine=(--vllm-args "--load-format dummy --block-size 16 --max-model-len 24576 --max-num-seqs 32"
        --gpu-blocks "${GPU_BLOCKS:-1800}" --startup-timeout 900 --no-progress)
workload=(--num-users 8 --num-rounds 8 --system-prompt 1000 --chat-history 12000 --answer-len 64
          --qps 1 --warmup-users 8)

declare -A conf=(
  [vllm-offload]="--kv-offloading-size 32"
  [kvbm-host]="DYN_KVBM_CPU_CACHE_GB=$gib32 DYN_KVBM_METRICS=1 DYN_KVBM_LAYERWISE_LOADS=off"
  [kvbm-host-layer]="DYN_KVBM_CPU_CACHE_GB=$gib32 DYN_KVBM_METRICS=1 DYN_KVBM_LAYERWISE_LOADS=on"
  [kvbm-host+disk]="DYN_KVBM_CPU_CACHE_GB=$gib32 DYN_KVBM_DISK_CACHE_GB=20 DYN_KVBM_DISK_CACHE_DIR=/tmp/kvbm-g3 DYN_KVBM_METRICS=1"
  [floor]="--num-gpu-blocks-override ${FLOOR_BLOCKS:-24000}"
)
configs() {  # names -> --config options (vllm is the built-in baseline)
  for name in "$@"; do [ "$name" = vllm ] || printf '%s\0' --config "$name=${conf[$name]}"; done
}
REUSE=${REUSE-"vllm vllm-offload kvbm-host kvbm-host-layer floor"}
NO_REUSE=${NO_REUSE-"vllm kvbm-host-layer"}

if [ -n "$REUSE" ]; then
  mapfile -d '' extra < <(configs $REUSE)
  "$PY" -m kvbm bench compare "$model" "${engine[@]}" "${workload[@]}" --time 45 --configs vllm "${extra[@]}" \
    --out "$out/reuse" "$@"
fi
if [ -n "$NO_REUSE" ]; then
  mapfile -d '' extra < <(configs $NO_REUSE)
  "$PY" -m kvbm bench compare "$model" "${engine[@]}" "${workload[@]}" --time 30 --no-reuse --qps 4 --chat-history 2000 \
    --configs vllm "${extra[@]}" --out "$out/no-reuse" "$@"
fi
