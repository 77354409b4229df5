#!/usr/bin/env bash
# The test suite: installs what is missing, then runs every test on CPU (about 5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q tests "$@"
