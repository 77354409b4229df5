import os
import sys

# Tests never touch a hub, and vLLM runs in this process on CPU (fast start, seeds work).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import subprocess  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: goes through the local Slurm (needs root; started once a session)")


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    """A real Slurm on this machine (slurm/local_slurm.sh: two emulated nodes), started for
    the session by the first test marked `slurm` that asks for it, so every Submitit launch
    in those tests goes through sbatch. Needs root; `pytest -m "not slurm"` runs the rest
    as any user, with nothing started."""
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", os.path.join(ROOT, "slurm", "local_slurm.sh"), "start", str(state)],
                           capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, "could not start the local Slurm:\n" + start.stdout[-2000:] + start.stderr[-2000:]
    before = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    os.environ["PATH"] = f"{state / 'bin'}{os.pathsep}{os.environ['PATH']}"
    yield state
    os.environ.update({k: v for k, v in before.items() if v is not None})
    if before["SLURM_CONF"] is None:
        os.environ.pop("SLURM_CONF")
    subprocess.run(["bash", os.path.join(ROOT, "slurm", "local_slurm.sh"), "stop", str(state)], timeout=120)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The demo's model, pre-trained briefly on clean data: ~17% held-out accuracy at T=1."""
    from demo.base_model import ensure_base_model
    return ensure_base_model(str(tmp_path_factory.mktemp("models") / "tiny"), steps=600, noise=0.0)


def real_shaped_model(root, name: str, context: int = 131072) -> str:
    """A model directory as a cluster holds it, for checks that read no weight: `name`'s
    config.json (its real shape: heads, KV heads, widths, vocabulary; Qwen2.5's context), a
    safetensors file of one number standing for the weights, and the demo's tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    from demo.base_model import build_tokenizer
    from slurm.memory_budget import KNOWN_SHAPES
    path = os.path.join(str(root), name.split("/")[-1])
    Qwen2Config(**KNOWN_SHAPES[name], max_position_embeddings=context).save_pretrained(path)
    save_file({"placeholder": torch.zeros(1)}, os.path.join(path, "model.safetensors"))
    build_tokenizer().save_pretrained(path)
    return path


def start_run(model_dir: str, run_dir, total_steps: int, *flags: str) -> subprocess.Popen:
    """Two trainers and a rollout process generating one step ahead, a checkpoint every step."""
    return subprocess.Popen(
        [sys.executable, "train_dapo.py", "--nproc_per_node", "3", "--rollout_nodes", "1", "--max_staleness", "1",
         "--model_path", model_dir,
         "--total_steps", str(total_steps), "--save_every", "1", "--prompts_per_step", "4", "--group_size", "8",
         "--gen_prompts_per_round", "16", "--mini_batch_size", "16", "--val_data", "", "--wandb_mode", "disabled",
         "--run_dir", str(run_dir), *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def straight(tiny_model_dir, tmp_path_factory):
    """start_run's layout (K = 1: a checkpoint holds a batch made ahead), 4 steps uninterrupted:
    what every interrupted run must log (test_distributed.py), and checkpoints written by two
    trainers (test_export.py). Its run_dir (checkpoints/step-3, step-4, final/) and metrics."""
    from test_checkpoint import step_metrics
    run_dir = tmp_path_factory.mktemp("straight")
    proc = start_run(tiny_model_dir, run_dir, total_steps=4)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return types.SimpleNamespace(run_dir=run_dir, metrics=step_metrics(run_dir))
