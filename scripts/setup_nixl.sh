#!/usr/bin/env bash
# Install NIXL (for disaggregated prefill/decode: vLLM's NixlConnector) into .venv.
# Idempotent: does nothing when the pinned version already imports.
#
# PyPI's `nixl` is a meta package that would pull a CUDA torch and other deps;
# `--no-deps` with the CUDA-13 wheel (which bundles UCX and runs on CPU-only
# machines, moving host memory over TCP/shared memory) is all that is needed.
# Run scripts/setup.sh first: torch must already be the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
NIXL_VERSION=${NIXL_VERSION:-1.5.1}
PY=${KVBM_VENV:-.venv}/bin/python
if [ ! -x "$PY" ]; then
  echo "setup_nixl: ${KVBM_VENV:-.venv} is missing; run scripts/setup.sh first" >&2
  exit 1
fi
have() {
  "$PY" - "$NIXL_VERSION" <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md, sys
assert md.version("nixl") == sys.argv[1]
assert md.version("nixl-cu13") == sys.argv[1]
import nixl._api  # noqa: F401  (the compiled bindings, not just the meta package)
PYEOF
}
if have; then
  echo "setup_nixl: nixl $NIXL_VERSION already installed"
  exit 0
fi
"$PY" -m pip install -q --no-deps "nixl==$NIXL_VERSION" "nixl-cu13==$NIXL_VERSION" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
if ! have; then
  echo "setup_nixl: nixl $NIXL_VERSION installed but does not import; see: $PY -c 'import nixl._api'" >&2
  exit 1
fi
echo "setup_nixl: nixl $NIXL_VERSION ready"
