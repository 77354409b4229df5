import os
import sys

# Tests never touch a hub, and vLLM runs in this process on CPU (fast start, seeds work).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The demo's model, pre-trained briefly on clean data: ~17% held-out accuracy at T=1."""
    from demo.base_model import ensure_base_model
    return ensure_base_model(str(tmp_path_factory.mktemp("models") / "tiny"), steps=600, noise=0.0)
