"""Our DAPO step against TRL's GRPOTrainer (loss_type="dapo", epsilon_high=0.28, beta=0), the
peer a user would pick on one machine. Same model (a random-init Qwen2 of ~24M
parameters, built here), same prompts (the demo's task through the same chat template),
16 samples per prompt, the same response cap, responses ending at varied lengths (EOS
from a near-uniform random model), the same reward (reward.compute_score), one optimizer
step per rollout step on both sides.

    .venv/bin/pip install -r requirements-bench.txt      # TRL, for this benchmark only
    python bench/trl_compare.py                          # ~15 minutes on 2 cores

The two sides run in alternating fresh processes (ours, TRL, TRL without gradient
checkpointing, then again, --rounds times); each process runs --steps steps, the first
a warm-up that is not counted. Medians over all counted steps:
- whole RL step (rollout + update, and for us the weight sync into the engine);
- rollout: our vLLM engine vs TRL's Hugging Face `generate`;
- policy update throughput, valid (non-padding) completion tokens per second;
- achieved FLOP/s of the step as a share of this CPU's fp32 matmul peak, measured in the
  same process (model FLOPs: 2N a token to generate or score, 6N to train).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402


def build_model(out: str) -> str:
    """~24M parameters: hidden 512, 10 layers, the demo's 43-token tokenizer (64 ids)."""
    from demo.base_model import build_model as build, build_tokenizer
    if not os.path.exists(os.path.join(out, "config.json")):
        tokenizer = build_tokenizer()
        model = build(tokenizer, hidden=512, layers=10, seed=0)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def matmul_peak() -> float:
    """fp32 FLOP/s of a large square matmul on this process's threads (best of 5)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(5))
    return 2 * n ** 3 / best


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count_params(model_dir: str) -> int:
    from transformers import AutoModelForCausalLM
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def run_ours(args, model_dir: str, data: str) -> list[dict]:
    import train_dapo as T
    torch.set_num_threads(os.cpu_count())
    cfg = T.resolve(T.Config(
        model_path=model_dir, train_data=data, val_data="", run_dir=tempfile.mkdtemp(), wandb_mode="disabled",
        prompts_per_step=args.prompts, group_size=16, max_response_len=args.max_len, mini_batch_size=args.prompts * 16,
        dynamic_sampling=False, overlong_filtering=False, overlong_punishment=False, lr=1e-6, warmup_steps=0,
        dtype="bfloat16" if args.side == "ours-bf16" else "float32"))
    T.join_alone()
    path = T.ensure_model(cfg)
    llm = T.make_rollout_engine(path, cfg.max_prompt_len + cfg.max_response_len, cfg.dtype, cfg.seed)[0]
    from transformers import AutoTokenizer
    policy, tokenizer = T.build_or_load_policy(cfg, path), AutoTokenizer.from_pretrained(path)
    sampler = T.PromptSampler(T.load_prompts(cfg.train_data, tokenizer, cfg.max_prompt_len), cfg.seed)
    optimizer, scheduler = T.make_optimizer(cfg, policy)
    generator = torch.Generator().manual_seed(0)
    steps, prompt_tokens, collect = [], [], T.collect_batch

    def counting_collect(cfg, llm, sampler, step, pool=None):
        out = collect(cfg, llm, sampler, step, pool)
        prompt_tokens.append(sum(len(r["prompt_ids"]) for r in out[0]) * cfg.group_size)
        return out
    T.collect_batch = counting_collect
    driver = T.Driver(llm, T.Rollouts(cfg, llm, sampler), val_rows=[])
    for step in range(1, args.steps + 1):
        m = T.train_step(cfg, step, driver, policy, optimizer, scheduler, generator)
        tokens = round(m["response/length_mean"] * args.prompts * 16)  # every group kept: no dynamic sampling
        steps.append({"step": m["time/step"], "rollout": m["time/rollout"], "valid_tokens": tokens,
                      "update": m["time/old_logprobs"] + m["time/update"],  # both passes an update needs
                      "prompt_tokens": prompt_tokens[-1], "response_len": m["response/length_mean"]})
    return steps


def run_trl(args, model_dir: str, data: str, checkpointing: bool) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import data_prep
    from reward import compute_score
    torch.set_num_threads(os.cpu_count())
    rows = data_prep.load_rows(data)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])

    def reward(prompts, completions, answer, **kwargs):
        return [compute_score(c[0]["content"], a)["score"] for c, a in zip(completions, answer)]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0,
        num_generations=16, max_completion_length=args.max_len, per_device_train_batch_size=16,
        gradient_accumulation_steps=args.prompts, learning_rate=1e-6, max_steps=args.steps, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, bf16=False, temperature=1.0, top_p=1.0,
        gradient_checkpointing=checkpointing, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    steps, current = [], {}
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        t0 = time.perf_counter()
        out = generate(inputs)
        current["rollout"] = current.get("rollout", 0.0) + time.perf_counter() - t0
        current["valid_tokens"] = current.get("valid_tokens", 0) + int(out["completion_mask"].sum())
        current["prompt_tokens"] = current.get("prompt_tokens", 0) + int(out["prompt_mask"].sum())
        return out
    trainer._generate_and_score_completions = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            current.clear()
            current["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            total = time.perf_counter() - current.pop("t0")
            steps.append({"step": total, "rollout": current["rollout"], "update": total - current["rollout"],
                          "valid_tokens": current["valid_tokens"], "prompt_tokens": current["prompt_tokens"],
                          "response_len": current["valid_tokens"] / (args.prompts * 16)})
    trainer.add_callback(StepTimer())
    trainer.train()
    return steps


def one_side(args) -> None:
    """In a fresh process: run one side, print its per-step records and the matmul peak as JSON."""
    model_dir, data = build_model(args.model_dir), args.data
    steps = run_ours(args, model_dir, data) if args.side.startswith("ours") else \
        run_trl(args, model_dir, data, checkpointing=args.side == "trl")
    print("RESULT " + json.dumps({"side": args.side, "steps": steps[1:], "peak": matmul_peak()}), flush=True)


SIDES = {"ours": "ours (vLLM fp32 + FSDP2 update)", "ours-bf16": "ours, vLLM engine in bf16 (trainer fp32)",
         "trl": "TRL GRPOTrainer (its defaults: gradient checkpointing)",
         "trl-nogc": "TRL GRPOTrainer, gradient checkpointing off"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps a process runs; the first is not counted")
    parser.add_argument("--prompts", type=int, default=8, help="prompts a step, 16 samples each")
    parser.add_argument("--max_len", type=int, default=128, help="response cap, tokens")
    parser.add_argument("--sides", nargs="+", choices=sorted(SIDES), default=list(SIDES))
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", default=os.path.join(ROOT, ".cache", "bench-qwen2-24m"))
    parser.add_argument("--data", default="synthetic:train", help="prompts, anything data_prep.load_rows reads")
    args = parser.parse_args()
    if args.side:
        return one_side(args)
    build_model(args.model_dir)
    params = count_params(args.model_dir)
    results = {side: [] for side in args.sides}
    peaks = []
    for r in range(args.rounds):
        for side in args.sides:
            command = [sys.executable, os.path.abspath(__file__), "--side", side, "--steps", str(args.steps),
                       "--prompts", str(args.prompts), "--max_len", str(args.max_len), "--model_dir", args.model_dir,
                       "--data", args.data]
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            result = json.loads(line[7:])
            results[side] += result["steps"]
            peaks.append(result["peak"])
            print(f"round {r + 1}, {side}: " + ", ".join(f"{s['step']:.2f}s" for s in result["steps"]), flush=True)
    report(args, params, results, statistics.median(peaks))


def report(args, params: int, results: dict, peak: float) -> None:
    med = {side: {k: statistics.median(s[k] for s in steps) for k in steps[0]} for side, steps in results.items()}
    for m in med.values():
        m["update_tps"] = m["valid_tokens"] / m["update"]
        # useful model FLOPs, the same for both sides: generate (2N a token), train (6N); our
        # old-log-prob pass (2N) is not counted: TRL skips it with one update a step
        train_tokens = m["valid_tokens"] + m["prompt_tokens"]
        m["flops"] = 2 * params * train_tokens + 6 * params * train_tokens
        m["flops_share"] = m["flops"] / m["step"] / peak
    base = med["trl"]
    print(f"\n{params / 1e6:.1f}M parameters, {args.prompts} prompts x 16 samples, responses up to {args.max_len} "
          f"tokens, {args.rounds} rounds x {args.steps - 1} counted steps; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| side | step s | x TRL | rollout s | x TRL | update s | valid tok/s | x TRL | mean response len | "
          "FLOP/s share of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side, m in med.items():
        print(f"| {SIDES[side]} | {m['step']:.2f} | {base['step'] / m['step']:.2f} | {m['rollout']:.2f} | "
              f"{base['rollout'] / m['rollout']:.2f} | {m['update']:.2f} | {m['update_tps']:.0f} | "
              f"{m['update_tps'] / base['update_tps']:.2f} | {m['response_len']:.1f} | {100 * m['flops_share']:.1f}% |")


if __name__ == "__main__":
    main()
