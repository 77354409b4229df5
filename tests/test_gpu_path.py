"""The GPU path's branches that run on CPU: which GPUs each process of a launch owns,
bf16 compute over fp32 master weights under FSDP2 (a group of one and of two), buffers made
where the policy lives, and the GPU smoke test refusing to run without a GPU."""
import os
import subprocess
import sys

import pytest
import torch

import train_dapo
from distributed_worker import tiny_policy, update_batch, update_gradient
from test_distributed import torchrun
from train_dapo import assign_gpus, engines_per_node, parse_config, process_roles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (flags, GPUs per node): the README's layouts and slurm/'s, as a user would run them on GPUs
LAYOUTS = [
    (["--nproc_per_node", "3", "--rollout_nodes", "1"], 3),
    (["--nproc_per_node", "8", "--rollout_nodes", "1"], 8),
    (["--nproc_per_node", "5", "--rollout_nodes", "1", "--tensor_parallel_size", "4"], 8),
    (["--slurm_nodes", "2", "--rollout_nodes", "1", "--slurm_gpus_per_node", "1"], 1),  # slurm/small.sh on GPUs
    (["--slurm_nodes", "2", "--nproc_per_node", "8", "--rollout_nodes", "1", "--slurm_gpus_per_node", "8"], 8),
    (["--slurm_nodes", "2", "--nproc_per_node", "8", "--rollout_nodes", "1", "--slurm_gpus_per_node", "8",
      "--tensor_parallel_size", "2"], 8),
    (["--slurm_nodes", "16", "--nproc_per_node", "8", "--rollout_nodes", "8", "--tensor_parallel_size", "8",
      "--slurm_gpus_per_node", "8"], 8),                                                 # slurm/qwen2.5-32b.sh
]


@pytest.mark.parametrize("flags, gpus", LAYOUTS)
def test_every_process_of_a_layout_owns_disjoint_gpus(flags, gpus):
    cfg = parse_config(flags + ["--run_dir", "unused"])
    nodes = cfg.slurm_nodes
    roles = process_roles(nodes * cfg.nproc_per_node, cfg.nproc_per_node, cfg.rollout_nodes, engines_per_node(cfg))
    if nodes > 1:  # every GPU of a rollout node in an engine
        assert roles.count("rollout") * cfg.tensor_parallel_size == cfg.rollout_nodes * gpus, roles
    for node in range(nodes):
        ranks = range(node * cfg.nproc_per_node, (node + 1) * cfg.nproc_per_node)
        owned = {r: assign_gpus(roles, r, cfg.nproc_per_node, cfg.tensor_parallel_size, gpus) for r in ranks}
        taken = [g for r in ranks for g in owned[r]]
        assert len(taken) == len(set(taken)) and all(0 <= g < gpus for g in taken), owned
        for r in ranks:
            expected = {"trainer": 1, "rollout": cfg.tensor_parallel_size, "standby": 0}[roles[r]]
            assert len(owned[r]) == expected, (r, roles[r], owned[r])


def test_engines_take_the_gpus_after_their_nodes_trainers():
    roles = process_roles(8, 8, 1)
    assert [assign_gpus(roles, r, 8, 1, 8) for r in range(8)] == [[r] for r in range(8)]
    roles = process_roles(5, 5, 1)
    assert assign_gpus(roles, 4, 5, 4, 8) == [4, 5, 6, 7] and assign_gpus(roles, 3, 5, 4, 8) == [3]
    roles = process_roles(16, 8, 1)  # 2 nodes: a trainer node, a rollout node whose 7 others stand by
    assert assign_gpus(roles, 8, 8, 8, 8) == list(range(8)) and assign_gpus(roles, 9, 8, 8, 8) == []
    assert assign_gpus(roles, 3, 8, 8, 0) == []  # CPU
    roles = process_roles(16, 8, 1, engines_per_node=4)  # a rollout node of 4 TP-2 engines, 4 processes standing by
    assert roles[8:] == ["rollout"] * 4 + ["standby"] * 4
    assert [assign_gpus(roles, r, 8, 2, 8) for r in range(8, 16)] == [[0, 1], [2, 3], [4, 5], [6, 7]] + [[]] * 4


@pytest.mark.parametrize("gpus, tp, nproc, engines", [(8, 1, 8, 8), (8, 2, 8, 4), (8, 8, 8, 1), (8, 1, 4, 4),
                                                       (0, 1, 2, 1), (4, 8, 8, 1)])
def test_a_rollout_node_holds_an_engine_per_tensor_parallel_share_of_its_gpus(gpus, tp, nproc, engines):
    cfg = parse_config(["--slurm_gpus_per_node", str(gpus), "--tensor_parallel_size", str(tp), "--nproc_per_node",
                        str(nproc), "--rollout_nodes", "1", "--slurm_nodes", "2", "--run_dir", "unused"],
                       check_model=False)
    assert engines_per_node(cfg) == engines


def test_a_layout_needing_more_gpus_than_the_node_has_is_refused_by_flag():
    roles = process_roles(8, 8, 1)
    with pytest.raises(ValueError, match="--nproc_per_node 8.*--tensor_parallel_size 2.*needs 9 GPUs, it has 8"):
        assign_gpus(roles, 0, 8, 2, 8)


def test_take_gpus_maps_onto_the_gpus_slurm_gave(monkeypatch):
    """Slurm's CUDA_VISIBLE_DEVICES 4-7: the engine's process sees only the last, a trainer
    selects its own index; vLLM's workers inherit the engine's variable."""
    cfg = parse_config(["--nproc_per_node", "4", "--rollout_nodes", "1", "--run_dir", "unused"])
    roles = process_roles(4, 4, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    selected = []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    train_dapo.take_gpus(cfg, roles, 3)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    train_dapo.take_gpus(cfg, roles, 1)
    assert selected == [1] and os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_update_buffers_live_where_the_policy_lives():
    """pi_old's log-probs and the entropy sum are made on the policy's device (on GPU: CUDA;
    here the meta device stands for it), never on the host by default."""
    with torch.device("meta"):
        policy = tiny_policy()
    old, entropy = train_dapo.old_logprob_buffers(policy, {"mask": torch.zeros(3, 5)})
    assert old.device.type == "meta" and entropy.device.type == "meta" and old.shape == (3, 5)


def relative_error(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


@pytest.fixture(scope="module")
def reference_gradient():
    """The update's gradient with no FSDP at all, fp32."""
    return update_gradient(tiny_policy())


def test_two_trainers_fp32_give_the_unsharded_gradient(tmp_path, reference_gradient):
    torchrun(2, "grads", str(tmp_path / "g.pt"), "float32")
    assert relative_error(torch.load(tmp_path / "g.pt"), reference_gradient) < 1e-5


def test_two_trainers_taking_pi_old_from_their_own_pass_give_the_unsharded_gradient(tmp_path):
    torchrun(2, "grads", str(tmp_path / "g.pt"), "float32", "reuse")
    one = update_gradient(tiny_policy(), reuse=True)
    assert relative_error(torch.load(tmp_path / "g.pt"), one) < 1e-5
    assert relative_error(one, update_gradient(tiny_policy())) > 0.05  # the ratios differ: the check can fail


def test_bf16_compute_over_fp32_masters_on_two_trainers_and_on_one(tmp_path, reference_gradient):
    """FSDP2's mixed precision as the GPU runs it, on gloo: the gradient is the fp32 one to
    bf16 accuracy, over two trainers and over a group of one (every one-GPU run); a scale
    error (a normaliser, the trainer count) would be off by 50% or more."""
    torchrun(2, "grads", str(tmp_path / "g.pt"), "bfloat16")
    two = torch.load(tmp_path / "g.pt")
    train_dapo.join_alone()
    policy = tiny_policy()
    train_dapo.shard_policy(policy, torch.bfloat16)
    seen = []

    def note_dtype(module, inputs, output):
        seen.append(output.dtype)

    policy.lm.model.layers[0].mlp.down_proj.register_forward_hook(note_dtype)
    one = update_gradient(policy)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    for grads in (two, one):
        error = relative_error(grads, reference_gradient)
        assert 1e-4 < error < 0.1, error  # bf16 really computed, and to its accuracy


def test_the_first_update_moves_each_weight_by_what_adamw_and_the_lr_predict():
    """One update a step on FSDP2's group of one, as the one-process run takes it (learn():
    pi_old from the update's own pass, the schedule, the gradient clip): AdamW's first step
    is lr x g / (|g| + eps) plus the decay, so every weight with a gradient moves by lr,
    whatever the loss's scale. The unsharded fp32 gradient predicts each weight's change."""
    lr, wd, clip = 2e-3, 0.1, 1.0
    reference = update_gradient(tiny_policy(), reuse=True)           # no FSDP, no clip
    scale = min(1.0, clip / (float(torch.cat([g.flatten() for g in reference.values()]).norm()) + 1e-6))
    train_dapo.join_alone()
    policy = tiny_policy()
    train_dapo.shard_policy(policy, torch.float32)
    before = {k: v.full_tensor().double().clone() for k, v in policy.state_dict().items()}
    cfg = train_dapo.resolve(train_dapo.Config(
        mini_batch_size=12, prompts_per_step=3, group_size=4, micro_batch_tokens=40, max_prompt_len=12,
        max_response_len=16, overlong_cache_len=4, lr=lr, warmup_steps=1, weight_decay=wd, grad_clip=clip,
        run_dir="unused"))
    optimizer, scheduler = train_dapo.make_optimizer(cfg, policy)
    metrics = train_dapo.learn(cfg, policy, optimizer, scheduler, update_batch(), torch.Generator().manual_seed(0))
    assert metrics["actor/updates"] == 1 and metrics["actor/lr"] == lr
    moved = []
    for name, value in policy.state_dict().items():
        g = reference[name] * scale
        step = value.full_tensor().double() - before[name] * (1 - lr * wd)  # the Adam part of the change
        predicted = -lr * g / (g.abs() + 1e-8)
        sure = g.abs() > 1e-6                                         # a sign float noise cannot flip
        torch.testing.assert_close(step[sure], predicted[sure], rtol=0, atol=0.02 * lr)
        assert step.abs().max() <= lr * 1.0001, name                  # no weight moves more than lr
        moved.append(step[sure].abs())
    moved = torch.cat(moved)
    assert len(moved) > 10_000 and float(moved.median()) == pytest.approx(lr, rel=1e-3)


def test_the_gpu_smoke_test_refuses_to_run_without_a_gpu():
    proc = subprocess.run([sys.executable, "scripts/gpu_smoke.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "nothing was checked" in proc.stderr


def budget_rows(flags: list[str]) -> list[tuple[str, float]]:
    from slurm.memory_budget import model_shape, trainer_budget, trainer_count
    cfg = parse_config(flags + ["--run_dir", "unused"], check_model=False)
    return trainer_budget(cfg, model_shape(cfg.model_path), trainer_count(cfg))


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-0.5B"])
def test_the_budgets_parameter_count_is_the_models(name):
    """The shards' rows are 4, 4 and 8 bytes a parameter over the trainers: the parameters
    they imply are those of the model transformers builds from the same shape."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slurm.memory_budget import KNOWN_SHAPES
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**KNOWN_SHAPES[name]))
    rows = dict(budget_rows(["--model_path", name, "--nproc_per_node", "4", "--rollout_nodes", "1"]))
    assert rows["fp32 master weights (sharded)"] * 3 / 4 == pytest.approx(sum(p.numel() for p in model.parameters()))


def test_the_32b_page_prints_what_the_budget_script_prints():
    flags = ["--preset", "paper", "--model_path", "Qwen/Qwen2.5-32B", "--slurm_nodes", "16", "--nproc_per_node", "8",
             "--rollout_nodes", "8"]
    page = open(os.path.join(ROOT, "slurm", "qwen2.5-32b.md")).read()
    for what, nbytes in budget_rows(flags):
        assert f"| {what} | {nbytes / 1e9:.1f} GB |" in page, what
