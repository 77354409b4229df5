import os
import sys

# Tests never touch a hub, and vLLM runs in this process on CPU (fast start, seeds work).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import subprocess  # noqa: E402

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
