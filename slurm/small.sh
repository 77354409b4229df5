#!/usr/bin/env bash
# The CPU demo as a two-node Slurm job: node 1 trains (FSDP2 on gloo), node 2 hosts the vLLM
# engine; weights go to it after every step. Runs on the local Slurm of local_slurm.sh:
#
#   bash slurm/local_slurm.sh start
#   export SLURM_CONF=$PWD/.slurm/slurm.conf PATH=$PWD/.slurm/bin:$PATH
#   bash slurm/small.sh [--flag value ...]     # later flags override these
#
# A USR2 (preemption, or 2 minutes before the time limit) checkpoints at the next step,
# Submitit requeues the job and it resumes there. Logs: <run_dir>/submitit/.
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" train_dapo.py --submit true \
    --slurm_nodes 2 --rollout_nodes 1 --slurm_cpus_per_task 2 --slurm_time_min 60 \
    --run_dir runs/slurm-small "$@"
