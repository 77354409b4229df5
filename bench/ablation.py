"""The paper's Table 1, small: naive GRPO, then DAPO's techniques added one at a time, each
row trained at the same budget (steps) on the CPU demo's task, several seeds each.

    python bench/ablation.py                       # 6 rows x 3 seeds, about 32 minutes on 2 cores
    python bench/ablation.py --steps 10 --seeds 0  # a quick look
    python bench/ablation.py --task chain --steps 50   # the chain task, where response length varies

Every run is `train_dapo.py` with the row's flags (below), in its own process; runs that
already finished in --out are reused, so an interrupted ablation continues where it
stopped. Prints a markdown table (final held-out accuracy, mean and spread over seeds;
steps to --target) and writes ablation.json and ablation.png into --out.

--task synthetic (the demo's task): the responses' cap is tighter than the demo's
(--max_response_len 32, --overlong_cache_len 8; the base model answers in about 24 tokens) so
that overlong filtering and the soft punishment have responses to act on. --task chain
(data_prep's chains of 1-8 additions, worked answers of 12-107 tokens, and a base model
pre-trained on a mix with guessed answers and doubled working, demo/base_model.py): L_max 128,
L_cache 16, so the punishment starts past the longest correct answer; 16 prompts a step,
lr 2e-4 (at the demo's 5e-4 every row without dynamic sampling loses accuracy)."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Cumulative, as in the paper's Table 1: each row is the previous one plus one technique.
ROWS = [
    ("naive GRPO", ["--preset", "grpo"]),
    ("+ overlong filtering", ["--overlong_filtering", "true"]),
    ("+ clip-higher", ["--eps_high", "0.28"]),
    ("+ soft overlong punishment", ["--overlong_punishment", "true"]),
    ("+ token-level loss", ["--loss_agg_mode", "token-mean"]),
    ("+ dynamic sampling (DAPO)", ["--dynamic_sampling", "true"]),
]
COMMON = ["--val_every", "10", "--val_max_problems", "100", "--val_samples", "4", "--save_every", "1000",
          "--wandb_mode", "disabled"]
CHAIN_MODEL = os.path.join(ROOT, ".cache", "base-model-chain")
TASK_FLAGS = {
    "synthetic": ["--max_response_len", "32", "--overlong_cache_len", "8"],
    "chain": ["--model_path", CHAIN_MODEL, "--train_data", "chain:train", "--val_data", "chain:val",
              "--max_response_len", "128", "--overlong_cache_len", "16",  # BENCHMARKS.md's reduced setting:
              "--prompts_per_step", "16", "--gen_prompts_per_round", "32", "--mini_batch_size", "64", "--lr", "2e-4"],
}


def row_flags(i: int) -> list[str]:
    return [flag for _, flags in ROWS[:i + 1] for flag in flags]


def run(out: str, i: int, seed: int, steps: int, task_flags: list[str]) -> list[dict]:
    run_dir = os.path.join(out, f"row{i}-seed{seed}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(os.path.join(run_dir, "final")):
        command = [sys.executable, os.path.join(ROOT, "train_dapo.py"), *row_flags(i), *COMMON, *task_flags,
                   "--seed", str(seed), "--total_steps", str(steps), "--run_dir", run_dir]
        t0 = time.time()
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"{ROWS[i][0]}, seed {seed} failed ({' '.join(command)}):\n{proc.stderr[-3000:]}")
        print(f"  {ROWS[i][0]:28s} seed {seed}: {time.time() - t0:.0f}s", flush=True)
    with open(metrics) as f:
        return [json.loads(line) for line in f]


def curve(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["val/acc"]) for r in rows if "val/acc" in r]


def steps_to(points: list[tuple[int, float]], target: float):
    return next((step for step, acc in points if acc >= target), None)


def final(rows: list[dict], key: str) -> float:
    return [r[key] for r in rows if key in r][-1]


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def summarize(results: dict, target: float) -> str:
    """One line a row. The last three evaluations' mean is steadier than the final one (400
    samples each); pass@k at the largest k (final, mean over seeds), the entropy over the last
    10 steps, the final held-out response length and truncated share, and over the last 10
    steps the share of groups dynamic sampling dropped, say why rows differ."""
    lines = ["| row | final held-out acc (mean ± sd) | per seed | last 3 evals (mean ± sd) "
             "| steps to acc >= %.2f (per seed) | pass@k | entropy | held-out length | truncated "
             "| groups dropped |" % target, "|---|---|---|---|---|---|---|---|---|---|"]
    for i, (name, _) in enumerate(ROWS):
        curves = [curve(rows) for rows in results[i]]
        finals = [c[-1][1] for c in curves]
        late = [statistics.mean(acc for _, acc in c[-3:]) for c in curves]
        reach = [steps_to(c, target) for c in curves]
        length = statistics.mean(final(rows, "val/response_length") for rows in results[i])
        truncated = statistics.mean(final(rows, "val/truncated_share") for rows in results[i])
        pass_key = next(k for k in results[i][0][-1] if k.startswith("val/pass@"))
        pass_k = statistics.mean(final(rows, pass_key) for rows in results[i])
        entropy = statistics.mean(r["actor/entropy"] for rows in results[i] for r in rows[-10:] if "actor/entropy" in r)
        dropped = statistics.mean(r["sampling/filtered_share"] for rows in results[i]
                                  for r in rows[-10:] if "sampling/filtered_share" in r)
        lines.append(f"| {name} | {mean_sd(finals)} | {', '.join(f'{a:.3f}' for a in finals)} | {mean_sd(late)} | "
                     f"{', '.join('-' if s is None else str(s) for s in reach)} | {pass_key[4:]} {pass_k:.3f} | "
                     f"{entropy:.3f} | {length:.1f} | {truncated:.1%} | {dropped:.0%} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, _) in enumerate(ROWS):
        curves = [curve(rows) for rows in results[i]]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[k][1] for c in curves) for k in range(len(steps))]
        lo = [min(c[k][1] for c in curves) for k in range(len(steps))]
        hi = [max(c[k][1] for c in curves) for k in range(len(steps))]
        line, = ax.plot(steps, mean, label=name)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (mean over seeds; band: min-max)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.50, help="held-out accuracy for the steps-to column")
    parser.add_argument("--task", choices=sorted(TASK_FLAGS), default="synthetic")
    parser.add_argument("--out", default="", help="default: runs/ablation, runs/ablation-chain for --task chain")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for every run (e.g. --prompts_per_step 16)")
    args = parser.parse_args()
    args.out = args.out or os.path.join(ROOT, "runs", "ablation" + ("" if args.task == "synthetic" else f"-{args.task}"))
    os.makedirs(args.out, exist_ok=True)
    if args.task == "chain":  # built once, then cached
        sys.path.insert(0, ROOT)
        from demo.base_model import ensure_base_model
        ensure_base_model(CHAIN_MODEL, task="chain")
    flags = TASK_FLAGS[args.task] + [a for a in args.extra if a != "--"]
    results = {i: [run(args.out, i, seed, args.steps, flags) for seed in args.seeds] for i in range(len(ROWS))}
    table = summarize(results, args.target)
    plot(results, os.path.join(args.out, "ablation.png"))
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump({"rows": [name for name, _ in ROWS], "seeds": args.seeds, "steps": args.steps, "task": args.task,
                   "flags": flags,
                   "curves": {ROWS[i][0]: [curve(r) for r in results[i]] for i in results}}, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()
