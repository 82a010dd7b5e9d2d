#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests and real-vLLM tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest -q --timeout 1200 "$@"
