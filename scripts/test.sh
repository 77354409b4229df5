#!/usr/bin/env bash
# The test suite: installs what is missing, then runs every test on CPU (about 7 minutes;
# as root: the tests start a local Slurm, slurm/local_slurm.sh, which installs its packages).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q tests "$@"
