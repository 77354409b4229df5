"""The GPU smoke test: run it on a machine with CUDA GPUs before the first real run.

    python scripts/gpu_smoke.py                  # Qwen2.5-0.5B's shape, random weights, built here
    python scripts/gpu_smoke.py --layers 4       # a smaller model of the same width

Builds a Qwen2 locally (no hub) and checks the GPU path of train_dapo.py, printing a
table: the policy sharded by FSDP2 on a group of one with bf16 compute over fp32 master
weights and Liger's kernels; a step's learning half (pi_old's pass, then two updates) and
the one-update path (pi_old from the update's own pass) against it; a checkpoint written
and read back on the GPU; packed flash-attention log-probs against padded sdpa; with vLLM,
the README's one-GPU command (--preset one_gpu) for two steps, the in-process layout
(engine beside the trainer on one GPU) for three, the trainer/engine log-prob gap, the
step-time split, decode tokens a second with and without per-request seeds, and after a
sync of weights no engine has seen, the live engine's per-token log-probs against a fresh
engine's from the saved weights; with two GPUs, one trainer plus one rollout process, and
with three, the engine tensor-parallel over two: each must keep the trainer/engine gap of
its first step while lr 1e-3 moves the weights (it grows if a sync loads nothing). Peak
memory and times are per check.

Exit status 0 only if every check ran and passed; 1 if one failed or could not run (a
missing package, one GPU where two are needed); 2 without a CUDA GPU: it never passes
on a machine that cannot run it.
"""
import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_dapo as T  # noqa: E402
from data_prep import FlagParser  # noqa: E402
from slurm.memory_budget import model_shape, trainer_budget  # noqa: E402

ROWS = []  # (check, status, detail)


def check(name: str, needs: tuple[str, ...] = (), gpus: int = 1):
    """Run the decorated check now, recording PASS, FAIL (with the error) or NOT RUN (why)."""
    def run(fn):
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing or torch.cuda.device_count() < gpus:
            why = f"{', '.join(missing)} not installed" if missing else f"needs {gpus} GPUs"
            ROWS.append((name, "NOT RUN", why))
            return fn
        gc.collect()  # the policies of earlier checks (FSDP's hooks make cycles)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            ok, detail = fn()
        except Exception as e:  # a check that crashes is a failed check, with its cause shown
            traceback.print_exc()
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        peak = torch.cuda.max_memory_allocated() / 1e9
        ROWS.append((name, "PASS" if ok else "FAIL", f"{detail} | {time.time() - t0:.1f} s, peak {peak:.1f} GB"))
        print(f"[{ROWS[-1][1]}] {name}: {ROWS[-1][2]}", flush=True)
        return fn
    return run


def build_model(path: str, args) -> None:
    """Qwen2.5-0.5B's shape (tied embeddings, 151,936 tokens), random weights; the demo's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from demo.base_model import build_tokenizer
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1e6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    # Logits of a few nats (std ~2.4, not ~0.6): log-probs that move visibly with the weights,
    # greedy answers rarely near a tie. Ids past the tokenizer's 43 decode to nothing, harmlessly.
    model.model.embed_tokens.weight.data.mul_(4)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)


def smoke_config(path: str, run_dir: str, **overrides) -> T.Config:
    fields = dict(model_path=path, run_dir=run_dir, prompts_per_step=8, group_size=4, mini_batch_size=16,
                  micro_batch_tokens=8192, max_prompt_len=128, max_response_len=1024, overlong_cache_len=256,
                  dynamic_sampling=False, dtype="bfloat16", gpu_memory_utilization=0.3, lr=1e-5, warmup_steps=1,
                  wandb_mode="disabled", val_data="", total_steps=3, save_every=100)
    return T.resolve(T.Config(**fields | overrides))


def random_batch(cfg: T.Config, seed: int) -> dict:
    """A step's batch as flatten_batch makes it: random prompts and responses of mixed
    lengths up to L_max (a few truncated), rewards of both signs."""
    g = torch.Generator().manual_seed(seed)
    rows, responses = [], []
    for _ in range(cfg.prompts_per_step):
        prompt = torch.randint(3, 43, (int(torch.randint(32, cfg.max_prompt_len, (1,), generator=g)),), generator=g)
        rows.append({"prompt_ids": prompt.tolist()})
        group = []
        for _ in range(cfg.group_size):
            n = int(torch.randint(64, cfg.max_response_len + 1, (1,), generator=g))
            group.append({"response_ids": torch.randint(3, 43, (n,), generator=g).tolist(),
                          "truncated": n == cfg.max_response_len, "vllm_logprobs": [-10.0] * n,
                          "reward": float(torch.randint(0, 2, (1,), generator=g)) * 2 - 1})
        responses.append(group)
    return T.flatten_batch(cfg, T.rollout_arrays(rows, responses))


def prompt_logprobs(llm, sequences: list[list[int]]) -> torch.Tensor:
    """Each token's log-prob under the engine given the tokens before it (the first has none):
    no sampling, so no ties to break differently."""
    from vllm import SamplingParams
    outs = llm.generate([{"prompt_token_ids": s} for s in sequences], SamplingParams(max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)
    return torch.tensor([lp[t].logprob for out, s in zip(outs, sequences) for lp, t in zip(out.prompt_logprobs[1:], s[1:])])


def launched(cfg: T.Config) -> tuple[bool, str]:
    """Run `cfg` as its own launch of train_dapo.py; it passes if every step is logged and the
    trainer/engine log-prob gap stays near its first step's, where both held the initial
    weights (with an lr that moves the weights, a sync that loads nothing widens it)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_dapo.py"), *T.config_argv(cfg)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return False, f"exit {proc.returncode} | " + proc.stderr[-300:].replace("\n", " ")
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if json.loads(line)["step"] > 0]
    gaps = [s["actor/vllm_logprob_diff"] for s in steps]
    return len(steps) == cfg.total_steps and max(gaps) < 2 * gaps[0] + 0.02, (
        f"{len(steps)} steps; vllm_logprob_diff by step {', '.join(f'{g:.4f}' for g in gaps)}; last step "
        f"{steps[-1]['time/step']:.1f} s (rollout {steps[-1]['time/rollout']:.1f} s, sync {steps[-1]['time/sync']:.2f} s)")


def some_weights(policy) -> dict:
    state = policy.state_dict()
    names = ["lm.model.layers.0.self_attn.q_proj.weight", "lm.model.layers.0.mlp.down_proj.weight"]
    return {n: state[n].full_tensor().detach().float().cpu().clone() for n in names}


def learn_once(cfg: T.Config, batch: dict, again: bool = False) -> tuple[dict, dict, dict]:
    """A fresh policy learns from `batch` once: metrics, and a few full weights before and
    after. again: then once more, warm (Triton compiles Liger's kernels on first use), and
    that pass's timings replace the first's."""
    policy = T.build_or_load_policy(cfg, cfg.model_path)
    optimizer, scheduler = T.make_optimizer(cfg, policy)
    before = some_weights(policy)
    metrics = T.learn(cfg, policy, optimizer, scheduler, dict(batch), torch.Generator().manual_seed(0))
    after = some_weights(policy)
    if again:
        warm = T.learn(cfg, policy, optimizer, scheduler, dict(batch), torch.Generator().manual_seed(0))
        metrics |= {k: v for k, v in warm.items() if k.startswith(("time/", "throughput/"))}
    return metrics, before, after


def run_checks(args) -> None:
    work = args.out or tempfile.mkdtemp(prefix="gpu-smoke-")
    path = os.path.join(work, "model")
    build_model(path, args)
    T.join_alone()
    cfg = smoke_config(path, os.path.join(work, "run"))
    print(f"model {path}: {args.layers} layers; work dir {work}", flush=True)

    @check("policy: FSDP2 on a group of one, fp32 master weights, bf16 compute, Liger kernels")
    def policy_precision():
        policy = T.build_or_load_policy(cfg, path)
        p = next(policy.parameters())
        seen = {}

        def note_dtype(module, inputs, output):
            seen["dtype"] = output.dtype

        layer = policy.lm.model.layers[0]
        layer.self_attn.q_proj.register_forward_hook(note_dtype)
        with torch.no_grad():
            T.policy_logprobs(policy, [[5, 6, 7]], [[8, 9]], 1.0)
        liger = [m._get_name() for m in (policy.lm.model.norm, layer.mlp)]
        ok = (type(p).__name__ == "DTensor" and p.dtype == torch.float32 and p.device.type == "cuda"
              and seen["dtype"] == torch.bfloat16 and all(n.startswith("Liger") for n in liger))
        return ok, (f"{type(p).__name__} {p.dtype} on {p.device}, q_proj computes in {seen['dtype']}, "
                    f"attention {policy.lm.config._attn_implementation}, {liger}")

    batch = random_batch(cfg, seed=1)
    tokens = sum(len(p) + len(r) for p, r in zip(batch["prompt_ids"], batch["response_ids"]))

    @check(f"learn: pi_old pass + 2 updates, {len(batch['mask'])} responses, {tokens} tokens, "
           f"{cfg.micro_batch_tokens}-token micro-batches")
    def separate_pass():
        metrics, _, _ = learn_once(cfg, batch, again=True)
        finite = all(v == v and abs(v) != float("inf") for v in metrics.values() if isinstance(v, float))
        return finite and metrics["actor/updates"] == 2, (
            f"warm: old log-probs {metrics['time/old_logprobs']:.2f} s, update {metrics['time/update']:.2f} s, "
            f"{metrics['throughput/update_tokens_per_s']:.0f} tok/s, entropy {metrics['actor/entropy']:.2f}, "
            f"grad norm {metrics['actor/grad_norm']:.3g}")

    @check("learn: one update with pi_old from its own pass = one update after a separate pass")
    def reuse_pass():
        one = smoke_config(path, cfg.run_dir, mini_batch_size=len(batch["mask"]))
        reused, w_initial, w_reused = learn_once(one, batch)
        separate = dict(batch)
        policy = T.build_or_load_policy(one, path)
        T.compute_old_logprobs(one, policy, separate)
        del policy
        passed, _, w_passed = learn_once(one, separate)
        # Adam's first step is about lr x sign(gradient), and bf16 noise flips the sign of the
        # smallest gradients: compare the gradient norm and the update's direction instead
        norms = reused["actor/grad_norm"], passed["actor/grad_norm"]
        a, b = (torch.cat([(w[n] - w_initial[n]).flatten() for n in w]) for w in (w_reused, w_passed))
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        return abs(norms[0] - norms[1]) < 0.01 * norms[1] and cosine > 0.9, (
            f"grad norm {norms[0]:.4g} vs {norms[1]:.4g}, cosine of the updates {cosine:.3f}, "
            f"pg_loss {reused['actor/pg_loss']:.4g} vs {passed['actor/pg_loss']:.4g}")

    for checkpointing in (True, False):
        @check(f"memory: measured peak of a step's learning against slurm/memory_budget.py, gradient "
               f"checkpointing {'on' if checkpointing else 'off'}")
        def memory():
            measured_cfg = smoke_config(path, cfg.run_dir, gradient_checkpointing=checkpointing)
            learn_once(measured_cfg, batch)
            measured = torch.cuda.max_memory_allocated()
            predicted = trainer_budget(measured_cfg, model_shape(path), trainers=1)[-1][1]
            return 0.6 < measured / predicted < 1.15, (f"measured {measured / 1e9:.1f} GB, budget {predicted / 1e9:.1f} GB "
                                                       f"(x{measured / predicted:.2f})")

    @check("checkpoint: DCP save and load on the GPU, then the HF export")
    def checkpoint():
        cfg = smoke_config(path, os.path.join(work, "checkpointed"))
        policy, tokenizer = T.build_or_load_policy(cfg, path), AutoTokenizer.from_pretrained(path)
        optimizer, scheduler = T.make_optimizer(cfg, policy)
        T.learn(cfg, policy, optimizer, scheduler, dict(batch), torch.Generator().manual_seed(0))
        sampler, generator = T.PromptSampler([{}] * 4, 0), torch.Generator().manual_seed(0)
        saved = T.save_checkpoint(cfg, 1, policy, tokenizer, optimizer, scheduler, sampler, generator)
        again = T.build_or_load_policy(cfg, path)
        optimizer2, scheduler2 = T.make_optimizer(cfg, again)
        T.load_checkpoint(cfg, saved, again, optimizer2, scheduler2, sampler, generator)
        gap = max(float((a.full_tensor() - b.full_tensor()).detach().abs().max())
                  for a, b in zip(policy.parameters(), again.parameters()))
        T.save_hf(again, tokenizer, os.path.join(work, "exported"))
        return gap == 0.0, f"restored weights differ by {gap}; exported to {work}/exported"

    @check("log-probs: packed flash-attention = padded sdpa (bf16)", needs=("flash_attn",))
    def packed():
        flash = T.build_or_load_policy(cfg, path)
        sdpa = T.build_or_load_policy(cfg, path)
        sdpa.lm.config._attn_implementation = "sdpa"
        idx = list(range(8))
        with torch.no_grad():
            a, _, _ = T.policy_logprobs(flash, [batch["prompt_ids"][i] for i in idx],
                                        [batch["response_ids"][i] for i in idx], 1.0, packed=True)
            b, _, _ = T.policy_logprobs(sdpa, [batch["prompt_ids"][i] for i in idx],
                                        [batch["response_ids"][i] for i in idx], 1.0, packed=False)
        valid = a != 0
        diff = (a - b).abs()[valid]
        return float(diff.mean()) < 2e-2, f"mean |diff| {float(diff.mean()):.2e}, max {float(diff.max()):.2e} nats"

    # before the in-process engine: this command's own engine takes 30% of an idle GPU
    @check("the README's one-GPU command (--preset one_gpu), 2 steps of 8 x 16 responses up to 3,072 tokens",
           needs=("vllm",))
    def readme_one_gpu():
        argv = ["--preset", "one_gpu", "--model_path", path, "--train_data", "synthetic:train", "--val_data",
                "synthetic:val", "--val_max_problems", "8", "--dynamic_sampling", "false", "--prompts_per_step", "8",
                "--mini_batch_size", "32", "--total_steps", "2", "--wandb_mode", "disabled",
                "--run_dir", os.path.join(work, "one_gpu")]  # a random model solves nothing: no group is mixed
        one = T.parse_config(argv)
        one.lr, one.warmup_steps = 1e-3, 1  # weights that move, so that the sync is seen (launched())
        return launched(one)

    live = {}  # the in-process run's engine, for the checks after it

    @check("in-process layout: engine beside the trainer on one GPU, 3 DAPO steps", needs=("vllm",))
    def in_process():
        live.update(T.train(cfg))
        with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f]
        last = steps[-1]
        return len(steps) == 3, (f"rollout {last['time/rollout']:.2f} s, update {last['time/update']:.2f} s, "
                                 f"sync {last['time/sync']:.3f} s, vllm_logprob_diff {last['actor/vllm_logprob_diff']:.4f}")

    @check("sampling: per-request seeds (reproducible) against one seed, tokens/s", needs=("vllm",))
    def seeds():
        from vllm import SamplingParams
        llm = live["llm"]
        prompts = [{"prompt_token_ids": p} for p in batch["prompt_ids"][:8]] * 8
        speeds = {}
        for name, params in (("per-request", [SamplingParams(n=8, max_tokens=256, ignore_eos=True, seed=i)
                                              for i in range(len(prompts))]),
                             ("one seed", SamplingParams(n=8, max_tokens=256, ignore_eos=True))):
            t0 = time.time()
            llm.generate(prompts, params, use_tqdm=False)
            speeds[name] = len(prompts) * 8 * 256 / (time.time() - t0)
        return True, (f"per-request {speeds['per-request']:.0f} tok/s, one seed {speeds['one seed']:.0f} tok/s "
                      f"(x{speeds['one seed'] / speeds['per-request']:.2f}: what --per_request_seeds false would gain)")

    # last in this process: a second engine that is dropped tears down vLLM's groups under the first
    @check("sync: after a sync of new weights, the live engine's per-token log-probs = a fresh engine's from "
           "the saved weights", needs=("vllm",))
    def synced():
        llm, policy = live["llm"], live["policy"]
        sequences = [p + r[:64] for p, r in zip(batch["prompt_ids"][:16], batch["response_ids"][:16])]
        before = prompt_logprobs(llm, sequences)  # also fills the prefix cache the sync must drop
        with torch.no_grad():  # weights no engine has seen
            for p in policy.parameters():
                p.add_(0.01 * torch.randn_like(p))
        T.sync_weights(cfg, llm, policy)
        T.save_hf(policy, live["tokenizer"], os.path.join(work, "moved"))
        after = prompt_logprobs(llm, sequences)
        fresh, _ = T.make_rollout_engine(os.path.join(work, "moved"), 256, "bfloat16", 0, gpu_memory_utilization=0.2)
        expected = prompt_logprobs(fresh, sequences)
        # same bf16 weights and kernels, batches of other shapes: far below the move's own size
        gap, moved = float((after - expected).abs().mean()), float((before - expected).abs().mean())
        return gap < 0.02 and gap < 0.1 * moved, (f"{len(expected)} tokens: mean |synced - fresh| {gap:.4f} nats "
                                                 f"(bound 0.02), the move itself {moved:.3f}")

    @check("1 trainer + 1 rollout process (2 GPUs), 3 DAPO steps, lr 1e-3", needs=("vllm",), gpus=2)
    def two_processes():
        return launched(smoke_config(path, os.path.join(work, "two"), nproc_per_node=2, rollout_nodes=1,
                                     gpu_memory_utilization=0.85, lr=1e-3))

    @check("1 trainer + 1 engine tensor-parallel over 2 GPUs (3 GPUs), 3 DAPO steps, lr 1e-3", needs=("vllm",), gpus=3)
    def tensor_parallel():
        return launched(smoke_config(path, os.path.join(work, "tp2"), nproc_per_node=2, rollout_nodes=1,
                                     tensor_parallel_size=2, gpu_memory_utilization=0.85, lr=1e-3))

    print("\n| check | result | detail |\n|---|---|---|")
    for name, status, detail in ROWS:
        print(f"| {name} | {status} | {detail} |")


def main() -> None:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24, help="decoder blocks (Qwen2.5-0.5B: 24)")
    parser.add_argument("--out", default="", help="work directory (default: a fresh temporary one)")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error(f"--layers {args.layers}: must be at least 1")
    if not torch.cuda.is_available():
        print("gpu_smoke: needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
              "nothing was checked. Run it on a GPU node.", file=sys.stderr)
        sys.exit(2)
    print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"flash_attn {'yes' if importlib.util.find_spec('flash_attn') else 'no'} | "
          f"vllm {'yes' if importlib.util.find_spec('vllm') else 'no'}", flush=True)
    run_checks(args)
    sys.exit(0 if all(status == "PASS" for _, status, _ in ROWS) else 1)


if __name__ == "__main__":
    main()
