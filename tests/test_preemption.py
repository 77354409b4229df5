"""Preemption loses nothing: a USR2 (what Slurm sends before preempting a job or at its
time limit) makes the run checkpoint at the next step and stop; the requeued or rerun job
resumes there and logs exactly what an uninterrupted run logs. Through the real local
Slurm of conftest.py: a signal from `scancel`, and a job of a higher-priority partition."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import real_shaped_model
from test_checkpoint import step_metrics
from train_dapo import checkpoint_dirs, engines_per_node, parse_config, process_roles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


def run_flags(model_dir, run_dir):
    return ["--model_path", model_dir, "--run_dir", str(run_dir), "--total_steps", str(STEPS), "--save_every", "100",
            "--prompts_per_step", "4", "--group_size", "8", "--gen_prompts_per_round", "16", "--mini_batch_size", "16",
            "--val_data", "", "--wandb_mode", "disabled"]


def run(command, **kwargs):
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run every preempted one must reproduce, step by step."""
    run_dir = tmp_path_factory.mktemp("straight")
    run([sys.executable, "train_dapo.py", *run_flags(tiny_model_dir, run_dir)])
    metrics = step_metrics(run_dir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    return metrics


def wait_for_step(run_dir, step: int, proc: subprocess.Popen) -> None:
    path, deadline = os.path.join(run_dir, "metrics.jsonl"), time.time() + 300
    while not (os.path.exists(path) and any(json.loads(line)["step"] >= step for line in open(path)
                                            if line.endswith("\n"))):
        assert proc.poll() is None and time.time() < deadline, f"no step {step} in {path}"
        time.sleep(0.1)


def assert_resumed_like_straight(run_dir, straight, log: str) -> None:
    """One checkpoint written at the signal (not at save_every), resumed from, and the
    whole run's metrics equal to the uninterrupted run's."""
    preempted = re.findall(r"preempted: checkpoint of step (\d+) written", log)
    assert len(preempted) == 1, log[-3000:]
    assert 2 <= int(preempted[0]) < STEPS
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', f'step-{preempted[0]}')}" in log
    assert step_metrics(run_dir) == straight


def test_usr2_checkpoints_at_the_next_step_and_the_rerun_matches_an_uninterrupted_run(tiny_model_dir, tmp_path,
                                                                                       straight):
    command = [sys.executable, "train_dapo.py", *run_flags(tiny_model_dir, tmp_path)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGUSR2)
    out = proc.stdout.read()
    assert proc.wait(timeout=300) == 3  # EXIT_PREEMPTED
    assert [os.path.basename(p) for p in checkpoint_dirs(tmp_path)] != [f"step-{STEPS}"]
    rerun = run(command)
    assert_resumed_like_straight(tmp_path, straight, out + rerun.stdout)


def submit_and_preempt(command, run_dir, preempt) -> str:
    """Submit through Submitit to the local Slurm, preempt the job after step 2, wait for the
    requeued job to finish. Returns the job's logs, every node's."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    submitted = proc.stdout.readline()
    job_id = re.search(r"submitted job (\d+) \(slurm\)", submitted).group(1)
    wait_for_step(run_dir, 2, proc)
    preempt(job_id)
    out = proc.stdout.read()
    assert proc.wait(timeout=600) == 0, out[-3000:]
    assert f"job {job_id} done: {os.path.join(run_dir, 'final')}" in out
    assert os.path.exists(os.path.join(run_dir, "final", "model.safetensors"))
    job = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in job, job  # requeued once, by Submitit
    folder = os.path.join(run_dir, "submitit")
    return {n: open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder)) if n.endswith("_log.out")}


@pytest.mark.slurm
def test_slurm_usr2_requeues_the_job_and_it_resumes_like_an_uninterrupted_run(tiny_model_dir, tmp_path, straight,
                                                                             local_slurm):
    command = [sys.executable, "train_dapo.py", "--submit", "true", "--slurm_time_min", "60",
               *run_flags(tiny_model_dir, tmp_path)]
    logs = submit_and_preempt(command, tmp_path, lambda job: run(["scancel", "--signal=USR2", job]))
    [log] = logs.values()
    assert "Caught signal SIGUSR2" in log
    assert_resumed_like_straight(tmp_path, straight, log)


@pytest.mark.slurm
def test_a_higher_priority_job_preempts_the_two_node_job_which_resumes(tiny_model_dir, tmp_path, straight,
                                                                      local_slurm):
    """slurm/small.sh (node 1 trains, node 2 hosts the engine) preempted by a job of the
    `urgent` partition that needs both nodes: Slurm sends USR2, the trainer checkpoints,
    Submitit requeues; once the urgent job is done the run resumes on the same layout."""
    urgent = ["sbatch", "--partition", "urgent", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "2",
              "--output", "/dev/null", "--wrap", "sleep 3"]
    logs = submit_and_preempt(["bash", "slurm/small.sh", *run_flags(tiny_model_dir, tmp_path)], tmp_path,
                              lambda job: run(urgent))
    [node1, node2] = logs.values()  # <job>_0_log.out, <job>_1_log.out
    assert node1.count("trainer 0 (rank 0) on") == 2 and node2.count("rollout engine 0 (rank 1) on") == 2
    assert "Caught signal SIGUSR2" in node1
    assert "triggered an exception" not in node2  # Slurm's SIGTERM after the requeue ends it quietly
    assert_resumed_like_straight(tmp_path, straight, node1)


def run_processes(run_dir) -> list[int]:
    """Processes whose command line names run_dir: the run's, on every (local) node."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(run_dir).encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


@pytest.mark.slurm
def test_a_killed_engine_on_the_second_node_ends_the_two_node_job_naming_it(tiny_model_dir, tmp_path, straight,
                                                                            local_slurm):
    """kill -9 of the engine's process on node 2 of slurm/small.sh's job: the submitting command
    ends within a minute, its last line naming the engine and its node (not the trainer on
    node 1 that noticed); no process of the job is left; the same command resumes and logs
    what an uninterrupted run logs."""
    command = ["bash", "slurm/small.sh", *run_flags(tiny_model_dir, tmp_path), "--save_every", "1"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = re.search(r"submitted job (\d+) \(slurm\)", proc.stdout.readline()).group(1)
    wait_for_step(tmp_path, 2, proc)
    node2 = open(os.path.join(tmp_path, "submitit", f"{job_id}_1_log.out")).read()
    engine = int(re.search(r"rollout engine 0 \(rank 1\) on \S+, pid (\d+)", node2).group(1))
    os.kill(engine, signal.SIGKILL)
    killed_at = time.time()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and time.time() - killed_at < 60
    assert err.strip().splitlines()[-1].startswith(
        "train_dapo.py: the job failed: the run stopped because rollout engine 0 (rank 1) on node 2 of 2 died or "
        "stopped answering (trainer 0 (rank 0): RuntimeError: rollout engine 0 (rank 1) died"), err[-6000:]
    while run_processes(tmp_path) and time.time() - killed_at < 60:
        time.sleep(0.5)
    assert not run_processes(tmp_path)
    rerun = run(command)
    assert "resumed from" in open(os.path.join(tmp_path, "submitit", sorted(
        n for n in os.listdir(os.path.join(tmp_path, "submitit")) if n.endswith("_0_log.out"))[-1])).read()
    assert step_metrics(tmp_path) == straight, rerun.stdout[-2000:]


def test_the_32b_launch_script_asks_for_the_papers_layout(tmp_path):
    """slurm/qwen2.5-32b.sh's flags, as the trainer parses them: 16 nodes x 8 GPUs, 64
    trainers and 8 TP-8 engines, the paper's preset; extra flags pass through."""
    echo = tmp_path / "echo_args"
    echo.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    echo.chmod(0o755)
    model = tmp_path / "Qwen2.5-32B"
    missing = subprocess.run(["bash", "slurm/qwen2.5-32b.sh"], cwd=ROOT, capture_output=True, text=True,
                             env=os.environ | {"PYTHON": str(echo), "MODEL": str(model)})
    assert missing.returncode == 1 and "hf download Qwen/Qwen2.5-32B" in missing.stderr  # a path, never a hub name
    real_shaped_model(tmp_path, "Qwen/Qwen2.5-32B")
    data = [tmp_path / "train.jsonl", tmp_path / "aime.jsonl"]
    for path in data:  # one row each: an empty data file is refused
        path.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    argv = run(["bash", "slurm/qwen2.5-32b.sh", "--slurm_partition", "gpu", "--train_data", str(data[0]),
                "--val_data", str(data[1])], env=os.environ | {"PYTHON": str(echo), "MODEL": str(model)}).stdout.splitlines()
    assert argv[0] == "train_dapo.py"
    cfg = parse_config(argv[1:])
    assert cfg.model_path == str(model) and cfg.slurm_mem == "0"
    assert (cfg.slurm_nodes, cfg.nproc_per_node, cfg.rollout_nodes, cfg.tensor_parallel_size) == (16, 8, 8, 8)
    assert (cfg.slurm_partition, cfg.slurm_gpus_per_node, cfg.submit) == ("gpu", 8, True)
    assert (cfg.prompts_per_step, cfg.group_size, cfg.max_response_len) == (512, 16, 20480)
    roles = process_roles(cfg.slurm_nodes * cfg.nproc_per_node, cfg.nproc_per_node, cfg.rollout_nodes,
                          engines_per_node(cfg))
    assert (roles.count("trainer"), roles.count("rollout"), roles.count("standby")) == (64, 8, 56)
