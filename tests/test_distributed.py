"""The multi-process layout on one machine: trainer processes sharing the policy with FSDP2
(gloo), a rollout process hosting the vLLM engine, weights broadcast in buckets, and a
job that stops, naming the culprit, when a process dies."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import pytest
import torch

from conftest import start_run
from distributed_worker import LONG_PROMPTS, tiny_policy, update_policy_once
from train_dapo import Cluster, checkpoint_dirs, compact, make_rollout_engine, process_roles, weight_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")


def torchrun(nproc: int, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--standalone", WORKER, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_roles_follow_from_the_launch():
    assert process_roles(3, 3, 1) == ["trainer", "trainer", "rollout"]
    assert process_roles(2, 2, 0) == ["trainer", "trainer"]
    # 4 nodes x 2 processes, the last node serving rollouts: its second process stands by
    assert process_roles(8, 2, 1) == ["trainer"] * 6 + ["rollout", "standby"]
    assert process_roles(8, 2, 2) == ["trainer"] * 4 + ["rollout", "standby"] * 2
    cluster = Cluster(process_roles(8, 2, 2))
    assert cluster.name(6) == "rollout engine 1 (rank 6)" and cluster.name(3) == "trainer 3 (rank 3)"
    with pytest.raises(ValueError, match="--rollout_nodes 2: 2 node"):
        process_roles(4, 2, 2)


def test_two_rank_fsdp2_update_equals_the_one_process_update(tmp_path):
    torchrun(2, "update", str(tmp_path / "fsdp.pt"))
    sharded = torch.load(tmp_path / "fsdp.pt")
    policy = tiny_policy()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    metrics = update_policy_once(policy)
    moved = max((policy.state_dict()[k] - before[k]).abs().max() for k in before)
    assert moved > 1e-4  # the comparison below can fail
    for name, value in policy.state_dict().items():
        assert (sharded["weights"][name] - value).abs().max() < 1e-5, name
    for key in ("actor/clipfrac_low", "actor/clipfrac_high", "actor/approx_kl", "actor/pg_loss", "actor/grad_norm"):
        assert sharded["metrics"][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-7), key
    assert sharded["metrics"]["update_tokens"] == metrics["update_tokens"]


def greedy(llm) -> tuple[list[list[int]], np.ndarray]:
    """Greedy answers to prompts longer than a KV block, and their tokens' log-probs."""
    from vllm import SamplingParams
    outs = compact(llm.generate([{"prompt_token_ids": p} for p in LONG_PROMPTS],
                                SamplingParams(temperature=0, max_tokens=16, logprobs=0), use_tqdm=False))
    return [o.outputs[0].token_ids.tolist() for o in outs], np.concatenate([o.outputs[0].logprobs for o in outs])


def test_synced_engine_answers_like_a_fresh_engine_from_the_saved_weights(tiny_model_dir, tmp_path):
    torchrun(3, "sync", str(tmp_path / "sync.json"), tiny_model_dir)
    synced = json.load(open(tmp_path / "sync.json"))
    assert synced["sync/bytes_per_s"] > 0 and synced["sync/buckets"] > 1  # weights split across broadcasts
    fresh, _ = make_rollout_engine(str(tmp_path / "synced"), 240, "float32", seed=0)
    base, _ = make_rollout_engine(tiny_model_dir, 240, "float32", seed=0)
    (fresh_tokens, fresh_lp), (base_tokens, _) = greedy(fresh), greedy(base)
    assert synced["greedy"] == fresh_tokens  # the engine had these prompts cached: the sync dropped that KV
    assert np.abs(np.concatenate(synced["logprobs"]) - fresh_lp).max() < 1e-4
    assert synced["greedy"] != base_tokens  # the sync moved the engine off the base weights


def test_a_checkpoint_of_two_trainers_loads_exactly_on_one_and_on_three(tmp_path):
    """DCP reshards: the weights and AdamW state two trainers saved after an update are what
    one trainer, and three (uneven shards of 64-row matrices), hold after loading them; the
    update order's generator carries over (a third trainer takes trainer 0's)."""
    torchrun(2, "save", str(tmp_path))
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    assert any(float(v["exp_avg"].abs().sum()) > 0 for v in saved["optimizer"]["state"].values())  # a real state
    for trainers in (1, 3):
        torchrun(trainers, "load", str(tmp_path))
        loaded = torch.load(tmp_path / f"loaded-{trainers}.pt", weights_only=False)
        assert torch.equal(loaded["generator"], saved["generator"])
        assert saved["model"].keys() == loaded["model"].keys()
        for name, weight in saved["model"].items():
            assert torch.equal(loaded["model"][name], weight), (trainers, name)
        assert saved["optimizer"]["state"].keys() == loaded["optimizer"]["state"].keys()
        for name, moments in saved["optimizer"]["state"].items():
            for key, value in moments.items():
                assert torch.equal(loaded["optimizer"]["state"][name][key], value), (trainers, name, key)


def test_a_two_trainer_run_resumes_on_one_trainer(tiny_model_dir, tmp_path, straight):
    """The uninterrupted two-trainer run's checkpoint of step 3, rerun with one trainer: step 4
    trains on the same batch (made ahead, in the checkpoint) and so logs the same rollout,
    reward and sampling metrics exactly; the update's own (float sums over one trainer, not
    two) stay close."""
    import shutil

    from test_checkpoint import step_metrics
    shutil.copytree(straight.run_dir, tmp_path, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if n in ("step-4", "final", "exports")])
    proc = start_run(tiny_model_dir, tmp_path, 4, "--nproc_per_node", "2")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "1 trainer(s), 1 rollout process(es)" in out, err[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-3'}" in out
    resumed, expected = step_metrics(tmp_path)[4], straight.metrics[4]
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        if key.startswith(("reward/", "sampling/", "response/", "staleness/")):
            assert resumed[key] == value, key
        elif key.startswith("actor/") and key != "actor/updates":
            assert resumed[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


def test_every_engine_is_loaded_before_any_joins_the_weight_group(tmp_path):
    """Engines that finish loading 4 s apart (minutes, at 32B): the first is told to join only
    once the last is ready, so no member waits on the group's rendezvous for another's
    loading; then a bucket reaches both."""
    torchrun(3, "join", str(tmp_path / "engine"))
    engines = [json.load(open(tmp_path / f"engine-{i}.json")) for i in range(2)]
    assert engines[1]["ready"] - engines[0]["ready"] > 3  # they did start apart
    last_ready = max(e["ready"] for e in engines)
    assert all(e["join_weight_group"] >= last_ready for e in engines), engines
    assert all(e["received"] == [1.0, 2.0, 3.0] for e in engines)
    assert all(e["timeout_s"] == 60 for e in engines)  # twice --stall_timeout_min 0.5: the run's, not NCCL's 10 min


def test_the_weight_group_waits_as_long_as_the_run(monkeypatch):
    import vllm.distributed.utils
    seen = {}
    monkeypatch.setattr(vllm.distributed.utils, "stateless_init_torch_distributed_process_group",
                        lambda *args, **kwargs: seen.update(kwargs))
    weight_group("localhost", 1, 0, 2, timedelta(minutes=60))
    assert seen["timeout"] == timedelta(minutes=60)  # not the backend's default (NCCL: 10 minutes)


@pytest.mark.parametrize("victim", ["rollout engine 0 (rank 2)", "trainer 1 (rank 1)"])
def test_a_killed_process_ends_the_job_naming_it_and_the_rerun_matches(tiny_model_dir, tmp_path, straight, victim):
    """Kill -9 the rollout process, or a trainer that is not the driver, mid-run: within 10 s
    the job ends, its last line naming that process, and none of the run's processes is
    left; the same command then resumes from the last checkpoint and logs what an
    uninterrupted run logs, step for step."""
    kill_and_rerun(tiny_model_dir, tmp_path, victim, straight.metrics, "2 trainer(s), 1 rollout process(es)")


def kill_and_rerun(model_dir, tmp_path, victim: str, expected: dict, layout: str, *flags: str) -> None:
    """start_run(*flags) for 4 steps, `victim` killed -9 once step 2 is logged: the test above."""
    from test_checkpoint import step_metrics
    proc = start_run(model_dir, tmp_path, 4, *flags)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step    2 |"):
            break
    pid = int(re.search(re.escape(victim) + r" on \S+, pid (\d+)", "".join(lines)).group(1))
    assert layout in "".join(lines)
    run = descendants(proc.pid)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert time.time() - killed_at < 10 and proc.returncode != 0
    last_line = stderr.strip().splitlines()[-1]
    assert re.search(re.escape(victim) + r" on \S+, pid \d+: killed by SIGKILL", last_line), stderr[-3000:]
    assert not any(alive(p) for p in run)
    last = int(os.path.basename(checkpoint_dirs(tmp_path)[-1])[5:])  # a .partial left by the kill is no checkpoint
    assert 1 <= last < 4
    resumed = start_run(model_dir, tmp_path, 4, *flags)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / f'step-{last}'}" in out
    assert step_metrics(tmp_path) == expected
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_a_stalled_engine_ends_the_job_at_the_deadline_naming_it(tiny_model_dir, tmp_path):
    """SIGSTOP, not a death: nothing closes a socket, so only the deadline (--stall_timeout_min
    0.5: the driver waits 30 s on an engine) can end the run. It ends, its last line naming the
    engine the driver waited on, and no process is left (the stopped one too)."""
    proc = start_run(tiny_model_dir, tmp_path, 50, "--stall_timeout_min", "0.5")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step    2 |"):
            break
    pid = int(re.search(r"rollout engine 0 \(rank 2\) on \S+, pid (\d+)", "".join(lines)).group(1))
    run = descendants(proc.pid)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    _, stderr = proc.communicate(timeout=300)
    waited = time.time() - stopped_at
    last_line = stderr.strip().splitlines()[-1]
    assert re.search(r"because rollout engine 0 \(rank 2\) on .+ \(trainer 0 \(rank 0\): RuntimeError: rollout engine 0 "
                     r"\(rank 2\) died or stopped answering during '\w+': .*(?i:timed out|timeout)", last_line), stderr[-3000:]
    assert 30 <= waited < 30 + 45, waited  # the deadline, then elastic's grace before it SIGKILLs the stopped one
    assert not any(alive(p) for p in run)


def descendants(pid: int) -> set[int]:
    """pid's children, theirs, and so on, from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_launcher_when(proc: subprocess.Popen, marker: str) -> float:
    """SIGKILL the launcher once `marker` shows in its output; seconds until none of the
    processes it had started is left."""
    for line in proc.stdout:
        if marker in line:
            break
    run = descendants(proc.pid)
    assert len(run) >= 3, run
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    while any(alive(p) for p in run) and time.time() - killed_at < 30:
        time.sleep(0.05)
    proc.stdout.close()
    proc.stderr.close()
    assert not any(alive(p) for p in run), [p for p in run if alive(p)]
    return time.time() - killed_at


def test_a_killed_launcher_takes_its_processes_along_and_the_rerun_matches(tiny_model_dir, tmp_path, straight):
    """SIGKILL to the launcher of two trainers and a rollout process, once while the engine
    starts and once mid-run: within 2 s no process of the run is left (they would write on
    into the run directory); the rerun then logs what an uninterrupted run logs."""
    from test_checkpoint import step_metrics
    run_dir = tmp_path / "killed"
    assert kill_launcher_when(start_run(tiny_model_dir, run_dir, 4), "rollout engine 0 (rank 2) on") < 2
    assert kill_launcher_when(start_run(tiny_model_dir, run_dir, 4), "step    2 |") < 2
    rerun = start_run(tiny_model_dir, run_dir, total_steps=4)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "resumed from" in out, err[-3000:]
    assert step_metrics(run_dir) == straight.metrics


def test_a_run_directory_has_one_writer_and_a_dead_ones_claim_lapses(tiny_model_dir, tmp_path):
    command = [sys.executable, "train_dapo.py", "--model_path", tiny_model_dir, "--save_every", "1",
               "--prompts_per_step", "4", "--group_size", "8", "--gen_prompts_per_round", "16",
               "--mini_batch_size", "16", "--val_data", "", "--wandb_mode", "disabled", "--run_dir", str(tmp_path)]
    first = subprocess.Popen(command + ["--total_steps", "1000"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    for line in first.stdout:
        if line.startswith("step    1 |"):
            break
    second = subprocess.run(command + ["--total_steps", "1000"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert f"--run_dir {tmp_path}: another run is writing it (pid {first.pid} on " in second.stderr, second.stderr
    first.kill()
    first.wait()
    first.stdout.close()
    third = subprocess.run(command + ["--total_steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "resumed from" in third.stdout, third.stderr[-3000:]


def failure(exitcode: int, message: str = "", pid: int = 100):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
    f = ProcessFailure(local_rank=0, pid=pid, exitcode=exitcode, error_file="<N/A>")
    f.message = {"message": message, "extraInfo": {}} if message else f.message
    return f


def test_the_launcher_names_the_process_that_stopped_the_run_not_the_ones_that_noticed():
    from train_dapo import Config, first_failure
    cfg = Config(nproc_per_node=3, rollout_nodes=1)
    driver_saw = "RuntimeError: rollout engine 0 (rank 2) died or stopped answering during 'generate': Timed out"
    engine_saw = "RuntimeError: trainer 0 (rank 0), the driver, died or stopped answering: Connection closed"
    killed, stopped = -signal.SIGKILL, -signal.SIGTERM  # SIGTERM: the launcher ending the rest
    # a stall: the driver names the engine, which the launcher then kills
    said = first_failure(cfg, 1, {0: failure(1, driver_saw), 1: failure(stopped), 2: failure(killed, pid=7)})
    assert said.startswith("rollout engine 0 (rank 2) on ") and \
        said.endswith(f"pid 7: killed by SIGKILL (trainer 0 (rank 0): {driver_saw})"), said
    # a killed trainer, though the engine blames the driver it lost first
    said = first_failure(cfg, 1, {0: failure(1, "RuntimeError: Connection closed"), 1: failure(killed, pid=8),
                                  2: failure(1, engine_saw)})
    assert said.startswith("trainer 1 (rank 1) on ") and said.endswith("pid 8: killed by SIGKILL"), said
    # on the driver's node of a two-node job: the engine on the other node, named by the driver
    two = Config(nproc_per_node=2, rollout_nodes=1, slurm_nodes=2)
    said = first_failure(two, 2, {0: failure(1, driver_saw), 1: failure(stopped)})
    assert said == f"rollout engine 0 (rank 2) on node 2 of 2 died or stopped answering (trainer 0 (rank 0): {driver_saw})"
    # nobody killed, nobody named: the first that failed by itself
    said = first_failure(cfg, 1, {0: failure(stopped), 1: failure(1, "ValueError: bad"), 2: failure(stopped)})
    assert said.startswith("trainer 1 (rank 1) on ") and said.endswith("exit status 1: ValueError: bad"), said
