#!/usr/bin/env bash
# Set up (if needed), then run the main job: vLLM alone vs vLLM + kvbm on a
# locally built model with a multi-user, multi-round chat workload.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/kvbm demo "$@"
