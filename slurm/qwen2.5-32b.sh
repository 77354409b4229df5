#!/usr/bin/env bash
# The paper's run (slurm/qwen2.5-32b.md): Qwen2.5-32B, 16 nodes x 8 GPUs, 8 trainer nodes
# (FSDP2 over 64 GPUs) and 8 rollout nodes (one tensor-parallel-8 vLLM engine each).
#
#   bash slurm/qwen2.5-32b.sh --slurm_partition <yours> [--slurm_account <yours>] [--flag value ...]
#
# First, once, on a shared filesystem (72 processes must not each resolve a hub name at once):
#   hf download Qwen/Qwen2.5-32B --local-dir models/Qwen2.5-32B     # or MODEL=<your copy>
#   python data_prep.py convert BytedTsinghua-SIA/DAPO-Math-17k --out data/dapo-math.jsonl
#   python data_prep.py convert <aime-2024.parquet> --out data/aime24.jsonl
# Two-day jobs; each time limit or preemption checkpoints and requeues (Submitit), up to
# --slurm_max_timeouts time limits. --slurm_mem 0: all of each node's host memory (trainer 0
# reads 131 GB of fp32 weights).
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/Qwen2.5-32B}
if [ ! -f "$MODEL/config.json" ]; then
  echo "no model at $MODEL (no config.json): download it first, e.g. hf download Qwen/Qwen2.5-32B --local-dir $MODEL" >&2
  exit 1
fi
exec "${PYTHON:-.venv/bin/python}" train_dapo.py --preset paper --model_path "$MODEL" \
    --train_data data/dapo-math.jsonl --val_data data/aime24.jsonl \
    --submit true --slurm_nodes 16 --nproc_per_node 8 --slurm_gpus_per_node 8 --slurm_cpus_per_task 64 \
    --slurm_mem 0 --rollout_nodes 8 --tensor_parallel_size 8 --slurm_time_min 2880 \
    --run_dir runs/qwen2.5-32b-dapo "$@"
