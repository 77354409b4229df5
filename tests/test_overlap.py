"""Overlapped rollouts (--max_staleness K): the schedule of which weights make which batch,
the batch of the next step made while the trainers learn, and a run with K = 1 that is
deterministic and resumes after a preemption exactly as if never stopped (the kills of
tests/test_distributed.py run with K = 1 too)."""
import json
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import train_dapo
from test_checkpoint import step_metrics
from test_preemption import ROOT, run, run_flags, wait_for_step
from train_dapo import Config, Rollouts, behaviour_version, resolve

STEPS = 5


def fake_collect(log: list, making: dict):
    """collect_batch's stand-in: one group, the engines' version and the thread noted."""
    busy = threading.Semaphore(1)

    def collect(cfg, llm, sampler, step, pool=None):
        assert busy.acquire(blocking=False), "two batches made at once"
        log.append((step, llm.version, threading.current_thread() is threading.main_thread()))
        making[step].set()
        busy.release()
        group = [{"response_ids": [1, 2], "vllm_logprobs": [-0.5, -0.5], "reward": float(k), "acc": k, "timeout": False,
                  "truncated": False} for k in (0, 1)]
        return [{"prompt_ids": [3]}], [group], [group], {"sampling/rounds": 1}
    return collect


@pytest.mark.parametrize("K", [0, 1, 2])
def test_each_batch_is_made_by_its_scheduled_weights_while_the_trainers_learn(K, monkeypatch):
    """Driven as train_step drives it: take step n's batch, "learn" (wait until the batch of
    step n + K is being made, which only a thread ahead of the trainers can do), wait for
    the engines, sync the weights of step n."""
    log, making = [], {n: threading.Event() for n in range(1, 9)}
    monkeypatch.setattr(train_dapo, "collect_batch", fake_collect(log, making))
    engines = type("Engines", (), {"version": 0})()
    rollouts = Rollouts(resolve(Config(total_steps=8, max_staleness=K, rollout_nodes=1, nproc_per_node=2,
                                       run_dir="unused")), engines, sampler=None)
    versions = []
    for step in range(1, 9):
        rollout, _ = rollouts.take(step)
        versions.append(int(rollout["versions"][0][0]))
        if K and step + K <= 8:  # learning overlaps the making of the batch K steps ahead
            assert making[step + K].wait(timeout=10), f"step {step}: batch {step + K} not made during the update"
        rollouts.idle()
        engines.version = step  # sync_weights
        rollouts.weights_loaded(step)
    rollouts.close()
    expected = [0] * (K + 1) + list(range(1, 8 - K))  # the weights after step n - 1 - K, the first K + 1 initial
    assert versions == expected == [behaviour_version(n, K) for n in range(1, 9)]
    assert [(step, version) for step, version, _ in log] == list(zip(range(1, 9), expected))
    assert all(in_main == (K == 0) for _, _, in_main in log)  # K = 0: the step makes its own batch


def test_overlap_needs_rollout_processes():
    with pytest.raises(ValueError, match="--max_staleness 1: overlap needs the engines in processes of their own"):
        resolve(Config(max_staleness=1, run_dir="unused"))
    assert resolve(Config(max_staleness=1, rollout_nodes=1, nproc_per_node=2, run_dir="unused")).tis == "on"
    assert resolve(Config(run_dir="unused")).tis == "off"  # K = 0: the loop as it was, unless asked


def overlap_flags(model_dir, run_dir, *extra):
    return ["--nproc_per_node", "2", "--rollout_nodes", "1", "--max_staleness", "1",
            *run_flags(model_dir, run_dir), "--total_steps", str(STEPS), *extra]


@pytest.fixture(scope="module")
def overlapped(tiny_model_dir, tmp_path_factory):
    """One trainer, one rollout process, K = 1, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("overlapped")
    run([sys.executable, "train_dapo.py", *overlap_flags(tiny_model_dir, run_dir)])
    metrics = step_metrics(run_dir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    return metrics, run_dir


def test_a_run_with_overlap_logs_staleness_importance_weights_and_waits(overlapped):
    metrics, run_dir = overlapped
    full = {m["step"]: m for m in map(json.loads, open(run_dir / "metrics.jsonl"))}
    assert [full[n]["staleness/max"] for n in range(1, STEPS + 1)] == [0] + [1] * (STEPS - 1)
    for n in range(1, STEPS + 1):
        assert 0 < full[n]["tis/weight_mean"] <= 2 and 0 <= full[n]["tis/truncated_share"] < 1
        assert 0 <= full[n]["time/rollout_idle_share"] <= 1 and 0 <= full[n]["time/trainer_wait_share"] <= 1
    assert np.mean([full[n]["actor/vllm_logprob_diff"] for n in range(2, STEPS + 1)]) > 0


def test_usr2_to_the_launcher_with_overlap_resumes_like_the_uninterrupted_run(tiny_model_dir, tmp_path, overlapped):
    """Only the launcher is signalled (as `kill -USR2 <pid>` does): it passes the signal on,
    the trainer checkpoints (with the batch made ahead: its weights are gone), the engine
    process ignores it, all stop, exit 3. The steps before the signal come from another run
    with the same seed: the same metrics too (K = 1 is deterministic)."""
    command = [sys.executable, "train_dapo.py", *overlap_flags(tiny_model_dir, tmp_path)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    preempted = int(re.search(r"preempted: checkpoint of step (\d+) written", out).group(1))
    assert 2 <= preempted < STEPS
    rerun = run(command)
    assert "1 trainer(s), 1 rollout process(es)" in rerun.stdout
    assert f"resumed from {tmp_path / 'checkpoints' / f'step-{preempted}'}" in rerun.stdout
    assert step_metrics(tmp_path) == overlapped[0]
