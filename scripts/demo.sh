#!/usr/bin/env bash
# The CPU demo: installs what is missing, builds the tiny base model once (~3 minutes),
# then trains it with DAPO for about 10 minutes. Extra arguments go to train_dapo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python train_dapo.py --run_dir "runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
