#!/usr/bin/env bash
# The test suite: installs what is missing, then runs every test on CPU (about 24 minutes on
# 2 cores; as root: the `slurm` tests start a local Slurm, slurm/local_slurm.sh, which installs
# its packages; `bash scripts/test.sh -m "not slurm"` runs the rest as any user).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q tests "$@"
