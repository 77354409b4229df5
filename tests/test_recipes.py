"""The GPU recipes as written: every README command that trains on GPUs resolves (flags,
the model's config, data, the GPU layout) on CPU against configs of the real models'
shapes; the one-GPU preset fits its GPU; a tensor-parallel size vLLM would refuse, or a
model directory without weights, is named before anything starts."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import real_shaped_model
from eval.evaluate import largest_tensor_parallel, tensor_parallel_problem, weights_problem
from slurm.memory_budget import model_shape, trainer_budget
from train_dapo import assign_gpus, engines_per_node, parse_config, process_roles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-32B"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name.split("/")[-1]: real_shaped_model(root, name) for name in MODELS}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name in ("dapo-math.jsonl", "aime24.jsonl"):  # a row each: an empty data file is refused
        (root / name).write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    return root


def readme_commands(program: str) -> list[str]:
    """The README's `python <program>` commands that name a model by a placeholder (<... dir>),
    each with its continuation lines joined and its comment dropped."""
    text = open(os.path.join(ROOT, "README.md")).read().replace("\\\n", " ")
    return [line.split("  #")[0] for line in text.splitlines()
            if line.startswith(f"python {program} ") and re.search(r"<Qwen[\w.-]+ dir>", line)]


def as_here(command: str, models: dict, data_dir) -> list[str]:
    """The command's arguments with the placeholders made real: the model of that shape, the data files."""
    command = re.sub(r"<(Qwen[\w.-]+) dir>", lambda m: models[m.group(1)], command)
    return shlex.split(command.replace("data/", f"{data_dir}/"))[2:]


def test_the_readme_has_gpu_commands_for_one_gpu_and_one_node():
    commands = readme_commands("train_dapo.py")
    assert any("--preset one_gpu" in c for c in commands), commands
    assert any("--nproc_per_node 8" in c for c in commands), commands


@pytest.mark.parametrize("index", range(len(readme_commands("train_dapo.py"))))
def test_every_readme_gpu_command_resolves_with_the_models_config(index, models, data_dir):
    argv = as_here(readme_commands("train_dapo.py")[index], models, data_dir) + ["--run_dir", "unused"]
    cfg = parse_config(argv)  # the model's context, heads and weights, the data files, every flag
    nodes = max(cfg.slurm_nodes, 1)
    roles = process_roles(nodes * cfg.nproc_per_node, cfg.nproc_per_node, cfg.rollout_nodes, engines_per_node(cfg))
    for rank in range(len(roles)):  # the layout fits 8-GPU nodes
        assign_gpus(roles, rank, cfg.nproc_per_node, cfg.tensor_parallel_size, gpus=8)
    assert cfg.dtype == "bfloat16" and cfg.lr <= 1e-5  # a GPU recipe, not the CPU demo's defaults


def test_the_one_gpu_preset_is_a_real_recipe_that_fits_an_80gb_gpu(models):
    cfg = parse_config(["--preset", "one_gpu", "--model_path", models["Qwen2.5-1.5B"], "--run_dir", "unused"])
    assert cfg.max_prompt_len >= 1024 and cfg.max_response_len >= 2048 and cfg.micro_batch_tokens >= 10000
    assert cfg.gradient_checkpointing and cfg.lr == 1e-6 and cfg.dtype == "bfloat16"
    assert cfg.max_prompt_len + cfg.max_response_len <= 4096  # Qwen2.5-Math-1.5B's context too
    trainer = trainer_budget(cfg, model_shape(models["Qwen2.5-1.5B"]), trainers=1)[-1][1]
    slack = 8e9  # NCCL, CUDA context, allocator: what the budget says it leaves out
    assert trainer + slack + cfg.gpu_memory_utilization * 80e9 < 80e9


@pytest.mark.parametrize("name, accepted", [
    ("Qwen2.5-1.5B", [1, 2, 4]),     # 12 heads, 2 KV heads, MLP 8960: 3 and 6 split no KV head evenly
    ("Qwen2.5-7B", [1, 2, 4]),       # 28 heads, 4 KV heads: 7 divides the heads, not the KV heads
    ("Qwen2.5-32B", [1, 2, 4, 8]),   # 40 heads, 8 KV heads
])
def test_tensor_parallel_sizes_are_those_vllm_accepts(name, accepted, models):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(models[name])
    assert [tp for tp in range(1, 9) if tensor_parallel_problem(config, tp) is None] == accepted
    assert largest_tensor_parallel(config, 8) == accepted[-1] and largest_tensor_parallel(config, 3) == 2
    width = AutoConfig.from_pretrained(models[name])
    width.intermediate_size += 1  # an MLP no split divides
    assert largest_tensor_parallel(width, 8) == 1


def one_line_error(argv: list[str]) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err[-3000:]
    return err


def test_a_tensor_parallel_size_vllm_would_refuse_is_named_before_anything_starts(models, tmp_path):
    err = one_line_error(["train_dapo.py", "--model_path", models["Qwen2.5-1.5B"], "--nproc_per_node", "2",
                          "--rollout_nodes", "1", "--tensor_parallel_size", "8", "--run_dir", str(tmp_path / "run")])
    assert "--tensor_parallel_size 8: does not divide the model's 12 attention heads" in err
    assert "the largest that works: 4" in err and not (tmp_path / "run").exists()


def test_eval_refuses_a_split_vllm_would_refuse_and_defaults_to_the_widest_it_accepts(models, data_dir, tmp_path,
                                                                                     monkeypatch):
    err = one_line_error(["-m", "eval.evaluate", "--model", models["Qwen2.5-7B"], "--data", f"{data_dir}/aime24.jsonl",
                          "--tensor-parallel-size", "8", "--out", str(tmp_path / "out")])
    assert "--tensor-parallel-size 8: does not divide the model's 28 attention heads" in err
    assert "the largest that works: 4" in err and not (tmp_path / "out").exists()
    import eval.evaluate as E
    seen = {}

    def make_engine(model, context, dtype, seed, tp):
        seen["tp"] = tp
        raise SystemExit  # the engine is all this test wants to see
    monkeypatch.setattr(E, "make_engine", make_engine)
    monkeypatch.setattr(E, "gpus_here", lambda: 8)  # an 8-GPU node
    for name, widest in (("Qwen2.5-1.5B", 4), ("Qwen2.5-32B", 8)):
        with pytest.raises(SystemExit):
            E.main(["--model", models[name], "--data", f"{data_dir}/aime24.jsonl", "--out", str(tmp_path / "o")])
        assert seen["tp"] == widest


def test_a_model_directory_without_its_weights_is_named_before_anything_starts(models, tmp_path):
    half = tmp_path / "half-copied"
    half.mkdir()
    (half / "config.json").write_text(open(os.path.join(models["Qwen2.5-7B"], "config.json")).read())
    err = one_line_error(["train_dapo.py", "--model_path", str(half), "--run_dir", str(tmp_path / "run")])
    assert f"--model_path {half}: holds a config.json but no weights" in err
    err = one_line_error(["-m", "eval.evaluate", "--model", str(half), "--data", "synthetic:val"])
    assert f"--model {half}: holds a config.json but no weights" in err
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (half / "model.safetensors.index.json").write_text(json.dumps(index))
    (half / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert weights_problem(str(half)) == ("model.safetensors.index.json lists 1 missing shard(s): "
                                          "model-00002-of-00002.safetensors")
    (half / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert weights_problem(str(half)) is None
    assert weights_problem(models["Qwen2.5-7B"]) is None and not (tmp_path / "run").exists()
