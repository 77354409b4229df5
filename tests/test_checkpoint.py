"""Checkpoints: resume as if nothing happened; partial and mismatched checkpoints refused."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from demo.base_model import build_model, build_tokenizer
from train_dapo import (Config, Policy, PromptSampler, RunError, checkpoint_dirs, load_checkpoint, make_optimizer,
                        resolve, save_checkpoint, train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("time/", "throughput/", "sync/")


def run_config(model_dir, run_dir, total_steps):
    # one update a step (mini-batch = batch): pi_old from the update's own pass, through a resume
    return resolve(Config(model_path=model_dir, total_steps=total_steps, save_every=2, prompts_per_step=4,
                          group_size=8, gen_prompts_per_round=16, mini_batch_size=32, lr=5e-4, warmup_steps=2,
                          val_every=2, val_max_problems=8, val_samples=2, wandb_mode="disabled", run_dir=str(run_dir)))


def step_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows}


def test_resumed_run_logs_exactly_what_an_uninterrupted_one_does(tiny_model_dir, tmp_path):
    train(run_config(tiny_model_dir, tmp_path / "straight", total_steps=4))
    train(run_config(tiny_model_dir, tmp_path / "resumed", total_steps=2))       # "preempted" after step 2
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as f:    # a step logged after the checkpoint,
        f.write(json.dumps({"step": 3, "lost": 1}) + "\n" + '{"step": 4, "los')  # and a line cut by a kill
    train(run_config(tiny_model_dir, tmp_path / "resumed", total_steps=4))       # requeued: resumes at 3
    straight, resumed = step_metrics(tmp_path / "straight"), step_metrics(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == [0, 1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == straight[step], step
    assert [os.path.basename(p) for p in checkpoint_dirs(tmp_path / "resumed")] == ["step-2", "step-4"]


def tiny_state(hidden=64):
    model = Policy(build_model(build_tokenizer(), hidden=hidden, layers=2, seed=0))
    cfg = resolve(Config(run_dir="unused", keep_checkpoints=2))
    optimizer, scheduler = make_optimizer(cfg, model)
    sampler = PromptSampler([{"id": str(i)} for i in range(10)], seed=0)
    return cfg, model, optimizer, scheduler, sampler, torch.Generator().manual_seed(0)


def train_one_step(model, optimizer, scheduler):
    model.lm(torch.tensor([[3, 4, 5, 6]]), labels=torch.tensor([[3, 4, 5, 6]])).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_round_trip_restores_everything_and_keeps_the_last_k(tmp_path):
    cfg, model, optimizer, scheduler, sampler, generator = tiny_state()
    cfg.run_dir = str(tmp_path)
    for step in (1, 2, 3):
        train_one_step(model, optimizer, scheduler)
        sampler.next(3)
        save_checkpoint(cfg, step, model, build_tokenizer(), optimizer, scheduler, sampler, generator)
    assert [os.path.basename(p) for p in checkpoint_dirs(tmp_path)] == ["step-2", "step-3"]
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    expected_next = torch.randperm(50, generator=copy)
    _, model2, optimizer2, scheduler2, sampler2, generator2 = tiny_state()  # a fresh trainer, as after a requeue
    assert load_checkpoint(cfg, checkpoint_dirs(tmp_path)[-1], model2, optimizer2, scheduler2, sampler2, generator2) == 3
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert (sampler2.epoch, sampler2.pos) == (sampler.epoch, sampler.pos) and sampler2.order == sampler.order
    assert torch.equal(torch.randperm(50, generator=generator2), expected_next)
    # the next update is bitwise the same: optimizer moments and schedule came back too
    train_one_step(model, optimizer, scheduler)
    train_one_step(model2, optimizer2, scheduler2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_config_or_shape_is_refused_by_name(tmp_path):
    cfg, model, optimizer, scheduler, sampler, generator = tiny_state()
    cfg.run_dir = str(tmp_path)
    save_checkpoint(cfg, 1, model, build_tokenizer(), optimizer, scheduler, sampler, generator)
    path = checkpoint_dirs(tmp_path)[-1]
    other = resolve(Config(run_dir=str(tmp_path), eps_high=0.3, total_steps=999))  # total_steps may change
    with pytest.raises(RunError, match=r"eps_high: checkpoint 0\.28, now 0\.3") as e:
        load_checkpoint(other, path, model, optimizer, scheduler, sampler, generator)
    assert "total_steps" not in str(e.value)
    _, wide, wide_opt, wide_sched, _, _ = tiny_state(hidden=128)
    with pytest.raises(RunError, match=r"parameter lm.model.embed_tokens.weight: checkpoint \[64, 64\], model \[64, 128\]"):
        load_checkpoint(cfg, path, wide, wide_opt, wide_sched, sampler, generator)


KILLED_WRITER = """
import sys, time, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from demo.base_model import build_tokenizer
from test_checkpoint import tiny_state, train_one_step
from train_dapo import save_checkpoint
cfg, model, optimizer, scheduler, sampler, generator = tiny_state()
cfg.run_dir = {run_dir!r}
train_one_step(model, optimizer, scheduler)
save_checkpoint(cfg, 2, model, build_tokenizer(), optimizer, scheduler, sampler, generator)
train_one_step(model, optimizer, scheduler)
real_save = torch.save
def slow_save(*a, **k):
    print("writing", flush=True)
    time.sleep(60)
    real_save(*a, **k)
torch.save = slow_save
save_checkpoint(cfg, 4, model, build_tokenizer(), optimizer, scheduler, sampler, generator)
"""


def test_kill_9_while_writing_leaves_the_previous_checkpoint_in_charge(tmp_path):
    script = KILLED_WRITER.format(root=ROOT, tests=os.path.dirname(__file__), run_dir=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"   # model and optimizer shards of step 4 are on disk
    assert os.listdir(tmp_path / "checkpoints" / "step-4.partial")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [os.path.basename(p) for p in checkpoint_dirs(tmp_path)] == ["step-2"]
    cfg, model, optimizer, scheduler, sampler, generator = tiny_state()
    cfg.run_dir = str(tmp_path)
    assert load_checkpoint(cfg, checkpoint_dirs(tmp_path)[-1], model, optimizer, scheduler, sampler, generator) == 2


def test_a_checkpoint_that_cannot_be_written_stops_the_run_naming_it(tiny_model_dir, tmp_path, monkeypatch):
    """The disk fills up at the second checkpoint: the run stops with one line naming the
    directory it could not write; the first checkpoint stays the one a rerun resumes from."""
    import errno

    import train_dapo
    real_save, calls = train_dapo.dcp.save, []

    def save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id)
    monkeypatch.setattr(train_dapo.dcp, "save", save)
    with pytest.raises(RunError) as e:
        train(run_config(tiny_model_dir, tmp_path, total_steps=4))
    partial = tmp_path / "checkpoints" / "step-4.partial"
    assert str(e.value) == (f"{partial}: the checkpoint of step 4 could not be written ([Errno 28] No space left on "
                            f"device); a rerun resumes from {tmp_path / 'checkpoints' / 'step-2'}")
    assert checkpoint_dirs(tmp_path) == [str(tmp_path / "checkpoints" / "step-2")]
    assert not (tmp_path / "final").exists()
