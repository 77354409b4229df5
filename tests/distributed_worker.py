"""One process of a multi-process check, started by torchrun from test_distributed.py:

    python -m torch.distributed.run --nproc_per_node N tests/distributed_worker.py MODE OUT [MODEL]

update: every process a trainer; one DAPO update of a tiny Qwen2 sharded with FSDP2.
        The trainers' full weights after it, and its metrics, go to OUT (rank 0).
grads:  every process a trainer; the full gradient of one DAPO update (FSDP2, compute in
        the dtype given; pi_old from the update's own pass if `reuse` follows) goes to OUT.
sync:   trainers plus one rollout process. The trainers move their weights, sync them to
        the engine, and save them; the driver writes the engine's greedy answers to OUT.
save:   every process a trainer; one DAPO update, then a checkpoint in OUT/run and the full
        weights and optimizer state in OUT/saved.pt. load: a checkpoint of OUT/run read by
        as many trainers as this launch has; their full state to OUT/loaded-<trainers>.pt.
join:   one trainer and two rollout processes whose (fake) engines load in 0 and 4 s; the
        driver opens the weight group and sends one bucket; each engine writes when it was
        ready, when it was told to join, and what it received to OUT-<engine>.json."""
import json
import os
import sys
import time

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_dapo  # noqa: E402
from demo.base_model import build_model, build_tokenizer  # noqa: E402
from train_dapo import Config, Policy, resolve  # noqa: E402

PROMPTS = [[3 + i, 9, 4 + 2 * i, 12] for i in range(10)]
LONG_PROMPTS = [p * 50 for p in PROMPTS]  # 200 tokens: KV blocks that vLLM's prefix cache keeps


def update_config() -> Config:
    # 40-token micro-batches: several per rank and uneven counts (a zero-weight pass)
    return resolve(Config(mini_batch_size=6, prompts_per_step=3, group_size=4, micro_batch_tokens=40,
                          max_prompt_len=12, max_response_len=16, overlong_cache_len=4, lr=1e-3, warmup_steps=1,
                          run_dir="unused"))


def update_batch() -> dict:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 40, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(12)]
    responses = [torch.randint(3, 40, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(12)]
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r)) for r in responses], batch_first=True)
    mask[3] = 0.0  # an overlong-filtered response
    return {"prompt_ids": prompts, "response_ids": responses, "vllm_logprobs": -mask,
            "advantages": torch.randn(12, generator=g), "mask": mask}


def update_policy_once(policy: Policy) -> dict:
    """Old log-probs, then two mini-batch AdamW steps, as a train step does them."""
    cfg, batch = update_config(), update_batch()
    optimizer, _ = train_dapo.make_optimizer(cfg, policy)
    train_dapo.compute_old_logprobs(cfg, policy, batch)
    # ratios on both sides of 1 and past both clip bounds: both signs of advantage carry gradient
    shift = 0.4 * torch.randn(batch["mask"].shape, generator=torch.Generator().manual_seed(3))
    batch["old_logprobs"] = batch["old_logprobs"] + shift * batch["mask"]
    return train_dapo.update_policy(cfg, policy, optimizer, batch, torch.Generator().manual_seed(0))


class GradientCapture:
    """Stands in for the optimizer: keeps the full gradient it is asked to step with."""

    def __init__(self, policy: Policy):
        self.policy, self.param_groups, self.grads = policy, [{"lr": 0.0}], {}

    def step(self) -> None:
        for name, p in self.policy.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            self.grads[name] = g.detach().double().clone()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.policy.parameters():
            p.grad = None


def update_gradient(policy: Policy, reuse: bool = False) -> dict:
    """The gradient of one whole-batch update whose ratios fall on both sides of 1 and past
    both clip bounds, so tokens of both advantage signs carry gradient; reuse: pi_old taken
    from the update's own pass instead (every ratio 1), as one update a step does."""
    cfg = resolve(Config(mini_batch_size=12, prompts_per_step=3, group_size=4, micro_batch_tokens=40,
                         max_prompt_len=12, max_response_len=16, overlong_cache_len=4, grad_clip=1e9,
                         run_dir="unused"))
    batch = update_batch()
    if not reuse:
        train_dapo.compute_old_logprobs(cfg, policy, batch)
        shift = 0.4 * torch.randn(batch["mask"].shape, generator=torch.Generator().manual_seed(3))
        batch["old_logprobs"] = batch["old_logprobs"] + shift * batch["mask"]
    capture = GradientCapture(policy)
    train_dapo.update_policy(cfg, policy, capture, batch, torch.Generator().manual_seed(0))
    return capture.grads


def check_grads(out: str, dtype: str, reuse: bool) -> train_dapo.Cluster:
    cluster = train_dapo.join_cluster(resolve(Config(run_dir="unused")))
    policy = tiny_policy()
    train_dapo.shard_policy(policy, getattr(torch, dtype))
    grads = update_gradient(policy, reuse)
    if torch.distributed.get_rank() == 0:
        torch.save(grads, out)
    return cluster


def tiny_policy() -> Policy:
    lm = build_model(build_tokenizer(), hidden=64, layers=2, seed=1)
    lm.config._attn_implementation = "sdpa"
    return Policy(lm)


def check_update(out: str) -> train_dapo.Cluster:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    cluster = train_dapo.join_cluster(resolve(Config(run_dir="unused")))
    policy = tiny_policy()
    train_dapo.shard_policy(policy, torch.float32)
    metrics = update_policy_once(policy)
    for p in policy.state_dict().values():  # the weight sync's gather: each shard cast where it lies, then gathered
        cast = p.to(torch.bfloat16)
        assert cast.placements == p.placements and cast.to_local().dtype == torch.bfloat16, cast
        assert torch.equal(train_dapo.full_tensor(cast), p.full_tensor().to(torch.bfloat16))
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() == 0:
        torch.save({"weights": full, "metrics": metrics}, out)
    return cluster


def loaded_like_the_file(policy: Policy, model: str) -> None:
    """Every trainer's sharded policy (trainer 0 read the file, the others got its
    shards and buffers) computes what the model read plainly computes."""
    from transformers import AutoModelForCausalLM
    plain = Policy(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa"))
    with torch.no_grad():
        got, _, _ = train_dapo.policy_logprobs(policy, PROMPTS, PROMPTS[::-1], temperature=1.0)
        expected, _, _ = train_dapo.policy_logprobs(plain, PROMPTS, PROMPTS[::-1], temperature=1.0)
    assert (got - expected).abs().max() < 1e-5, f"rank {torch.distributed.get_rank()}: {(got - expected).abs().max()}"


def check_sync(out: str, model: str) -> train_dapo.Cluster:
    from vllm import SamplingParams
    cfg = resolve(Config(model_path=model, nproc_per_node=3, rollout_nodes=1, dtype="float32", max_prompt_len=216,
                         max_response_len=24, weight_sync_bucket_mb=1, run_dir=os.path.dirname(out)))  # 2 buckets
    cluster = train_dapo.join_cluster(cfg)
    if cluster.roles[cluster.rank] == "rollout":
        train_dapo.serve_rollouts(cfg, cluster)
        return cluster
    policy, tokenizer = train_dapo.build_or_load_policy(cfg, model), AutoTokenizer.from_pretrained(model)
    loaded_like_the_file(policy, model)
    with torch.no_grad():  # weights no engine has seen: each rank moves its own shards
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    llm = train_dapo.RemoteEngines(cfg, cluster) if cluster.rank == 0 else None
    greedy = [{"prompt_token_ids": p} for p in LONG_PROMPTS], SamplingParams(temperature=0, max_tokens=16, logprobs=0)
    if llm is not None:  # their KV cached under the old weights: the sync must drop it
        llm.generate(*greedy)
    stats = train_dapo.sync_weights(cfg, llm, policy)
    train_dapo.save_hf(policy, tokenizer, os.path.join(cfg.run_dir, "synced"))
    if llm is not None:
        outs = llm.generate(*greedy)
        llm.stop()
        with open(out, "w") as f:
            json.dump({"greedy": [o.outputs[0].token_ids.tolist() for o in outs],
                       "logprobs": [o.outputs[0].logprobs.tolist() for o in outs], **stats}, f)
    return cluster


def full_state(policy: Policy, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model, optim = get_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": model, "optimizer": optim}


def reshard_state(out: str, save: bool) -> train_dapo.Cluster:
    cluster = train_dapo.join_cluster(resolve(Config(run_dir="unused")))
    cfg, trainers = update_config(), len(cluster.roles)
    cfg.run_dir, cfg.nproc_per_node = os.path.join(out, "run"), trainers  # a layout of its own, as a requeue has
    policy = tiny_policy()
    train_dapo.shard_policy(policy, torch.float32)
    optimizer, scheduler = train_dapo.make_optimizer(cfg, policy)
    sampler, generator = train_dapo.PromptSampler([{}] * 5, seed=0), torch.Generator().manual_seed(0)
    if save:
        batch = update_batch()
        train_dapo.compute_old_logprobs(cfg, policy, batch)
        train_dapo.update_policy(cfg, policy, optimizer, batch, generator)
        train_dapo.save_checkpoint(cfg, 1, policy, build_tokenizer(), optimizer, scheduler, sampler, generator)
    else:
        train_dapo.load_checkpoint(cfg, train_dapo.checkpoint_dirs(cfg.run_dir)[-1], policy, optimizer, scheduler,
                                   sampler, generator)
    state = full_state(policy, optimizer)
    if cluster.rank == 0:
        torch.save(state | {"generator": generator.get_state()},
                   os.path.join(out, "saved.pt" if save else f"loaded-{trainers}.pt"))
    return cluster


class SlowEngine:
    """Stands in for a vLLM engine (serve()'s side of it) that took `load_s` to load, noting
    when the driver's commands arrive; joins the weight group as a one-GPU engine's worker."""

    def __init__(self, out: str, load_s: float):
        time.sleep(load_s)
        self.out, self.seen = out, {"ready": time.time()}

    def collective_rpc(self, method: str, args=()):
        self.seen[method] = time.time()
        if method == "join_weight_group":
            host, port, rank, world, timeout = args
            self.group = train_dapo.weight_group(host, port, rank, world, timeout)
            self.seen["timeout_s"] = timeout.total_seconds()
        else:  # receive_weights: one bucket of (name, shape)
            (bucket,), _ = args
            flat = torch.empty(sum(n for _, (n,) in bucket))
            self.group.broadcast(flat, 0).wait()
            self.seen["received"] = flat.tolist()
            with open(self.out, "w") as f:
                json.dump(self.seen, f)
        return [None]

    def reset_prefix_cache(self) -> None:
        pass


def check_join(out: str) -> train_dapo.Cluster:
    cfg = resolve(Config(nproc_per_node=3, rollout_nodes=2, stall_timeout_min=0.5, run_dir="unused"))
    cluster = train_dapo.join_cluster(cfg)
    if cluster.roles[cluster.rank] == "rollout":
        engine = cluster.ranks("rollout").index(cluster.rank)
        train_dapo.serve(SlowEngine(f"{out}-{engine}.json", load_s=4.0 * engine), cluster)
        return cluster
    llm = train_dapo.RemoteEngines(cfg, cluster)
    llm.send("sync", [([[("w", [3])]], "float32")] * 2)
    llm.weight_group.broadcast(torch.tensor([1.0, 2.0, 3.0]), 0).wait()
    llm.receive("sync")
    llm.stop()
    return cluster


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "update":
        cluster = check_update(out)
    elif mode == "grads":
        cluster = check_grads(out, sys.argv[3], reuse=sys.argv[4:] == ["reuse"])
    elif mode == "join":
        cluster = check_join(out)
    elif mode in ("save", "load"):
        cluster = reshard_state(out, save=mode == "save")
    else:
        cluster = check_sync(out, sys.argv[3])
    train_dapo.leave_cluster(cluster)
