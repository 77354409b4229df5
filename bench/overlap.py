"""Overlapped rollouts (--max_staleness 1) against the synchronous loop (0), one trainer
process and one rollout process (one core each on the 2-core machine).

    python bench/overlap.py throughput --rounds 2 --steps 12    # 4.5 minutes
    python bench/overlap.py learning --seeds 0 1 2 --steps 40   # ~30 minutes, writes bench/overlap.png
    python bench/overlap.py tail --steps 12                     # ~15 minutes (and the chain model, once)

throughput: the sides alternate in fresh launches (K = 0, K = 1, then again) on a workload
where generation and update take about the same time; steps 1-2 are not counted. Prints
steps per minute, each side's idle share (from the run's own time/ metrics) and the ratio.
learning: the demo task and model, each seed with K = 0, K = 1 with truncated importance
sampling, K = 1 without it; held-out accuracy at equal steps, and curves against steps and
against wall-clock.
tail: a long tail of response lengths (the chain task: worked answers of 12-107 tokens, and a
base model that writes the working twice one time in ten, past the cap of 128), dynamic
sampling on and off. Sides: K = 0; K = 1 in whole rounds; K = 1 in segments of 16 tokens
(--segment_tokens). Prints steps a minute, the ratios, the engine's busy share, per-token
staleness and the mean importance weight.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = ["--nproc_per_node", "2", "--rollout_nodes", "1", "--wandb_mode", "disabled"]
# generation ~ update on one core each: one round of 32 prompts x 8 (no dynamic sampling, so every
# step generates the same amount), 4 updates a step
BALANCED = ["--dynamic_sampling", "false", "--prompts_per_step", "32", "--mini_batch_size", "64", "--val_data", ""]
SIDES = {"K=0": ["--max_staleness", "0"], "K=1, TIS": ["--max_staleness", "1", "--tis", "on"],
         "K=1, no TIS": ["--max_staleness", "1", "--tis", "off"],
         "K=1, segments": ["--max_staleness", "1", "--segment_tokens", "24"]}  # half the demo's cap


def launch(run_dir: str, flags: list[str]) -> list[dict]:
    proc = subprocess.run([sys.executable, "train_dapo.py", *LAYOUT, "--run_dir", run_dir, *flags], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def throughput(args) -> None:
    rows = {side: [] for side in ("K=0", "K=1, TIS")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in rows:
                run_dir = os.path.join(tmp, f"{side}-{r}".replace(", ", "-").replace("=", ""))
                steps = [m for m in launch(run_dir, [*BALANCED, "--total_steps", str(args.steps), *SIDES[side]])
                         if m["step"] > 2]
                rows[side] += steps
                print(f"round {r} {side}: {60 * len(steps) / sum(m['time/step'] for m in steps):.1f} steps/min",
                      flush=True)
    mean = lambda side, key: statistics.mean(m[key] for m in rows[side])  # noqa: E731
    base = 60 / mean("K=0", "time/step")
    print("\n| side | steps/min | x K=0 | step s | rollout s | learn s | sync s | trainer idle | engine idle |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side in rows:
        rate = 60 / mean(side, "time/step")
        learn = mean(side, "time/old_logprobs") + mean(side, "time/update")
        print(f"| {side} | {rate:.1f} | {rate / base:.2f} | {mean(side, 'time/step'):.2f} | "
              f"{mean(side, 'time/rollout'):.2f} | {learn:.2f} | {mean(side, 'time/sync'):.2f} | "
              f"{mean(side, 'time/trainer_wait_share'):.0%} | {mean(side, 'time/rollout_idle_share'):.0%} |")
    print(f"\n{len(rows['K=0'])} counted steps a side ({args.rounds} launches x steps 3-{args.steps}).")


CHAIN_MODEL = os.path.join(ROOT, ".cache", "base-model-chain")  # bench/ablation.py's
TAIL = ["--model_path", CHAIN_MODEL, "--train_data", "chain:train", "--val_data", "", "--max_response_len", "128",
        "--overlong_cache_len", "16", "--prompts_per_step", "16", "--gen_prompts_per_round", "32",
        "--mini_batch_size", "64", "--lr", "2e-4"]
TAIL_SIDES = {"K=0": ["--max_staleness", "0"], "K=1, rounds": ["--max_staleness", "1"]}


def tail(args) -> None:
    sys.path.insert(0, ROOT)
    from demo.base_model import ensure_base_model
    ensure_base_model(CHAIN_MODEL, task="chain")
    print("| dynamic sampling | side | steps/min | x K=0 | x K=1 rounds | engine busy | groups generated "
          "| staleness (tokens) | TIS weight |\n|---|---|---|---|---|---|---|---|---|")
    sides = TAIL_SIDES | {f"K=1, segments of {c}": ["--max_staleness", "1", "--segment_tokens", str(c)]
                          for c in args.segment_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        for ds in args.dynamic_sampling:
            rates = {}
            for side, flags in sides.items():
                run_dir = os.path.join(tmp, f"{side}-{ds}".replace(", ", "-").replace("=", "").replace(" ", ""))
                steps = [m for m in launch(run_dir, [*TAIL, "--dynamic_sampling", ds, "--total_steps", str(args.steps),
                                                     "--save_every", "1000", *flags]) if m["step"] > 2]
                mean = lambda key: statistics.mean(m.get(key, 0.0) for m in steps)  # noqa: E731
                rates[side] = 60 / mean("time/step")
                print(f"| {ds} | {side} | {rates[side]:.1f} | {rates[side] / rates['K=0']:.2f} | "
                      f"{rates[side] / rates.get('K=1, rounds', rates[side]):.2f} | "
                      f"{1 - mean('time/rollout_idle_share'):.0%} | {mean('sampling/groups_generated'):.1f} | "
                      f"{mean('staleness/mean'):.2f} | {mean('tis/weight_mean'):.3f} |", flush=True)
    print(f"\nsteps 3-{args.steps} of one launch a side; 1 trainer + 1 engine, one core each.")


def learning(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for side, flags in {side: SIDES[side] for side in args.sides}.items():
                run_dir = os.path.join(tmp, f"{side}-{seed}".replace(", ", "-").replace("=", "").replace(" ", ""))
                runs[side, seed] = launch(run_dir, ["--seed", str(seed), "--total_steps", str(args.steps),
                                                    "--val_every", str(args.val_every), *flags])
                final = [m for m in runs[side, seed] if "val/acc" in m][-1]
                print(f"seed {seed} {side}: val acc {final['val/acc']:.3f} after {final['time/elapsed']:.0f} s",
                      flush=True)
    print("\n| side | val acc at step " + " | ".join(f"{s}" for s in val_steps(runs)) + " | seconds to the last step |")
    print("|---|" + "---|" * (len(val_steps(runs)) + 1))
    for side in args.sides:
        cells = []
        for step in val_steps(runs):
            accs = [acc_at(runs[side, seed], step) for seed in args.seeds]
            cells.append(f"{statistics.mean(accs):.3f} ({min(accs):.3f}-{max(accs):.3f})")
        seconds = [runs[side, seed][-1]["time/elapsed"] for seed in args.seeds]
        print(f"| {side} | " + " | ".join(cells) + f" | {statistics.mean(seconds):.0f} |")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (side, seed), metrics in runs.items():
        pts = [(m["step"], m.get("time/elapsed", 0.0), m["val/acc"]) for m in metrics if "val/acc" in m]
        color = {"K=0": "C0", "K=1, TIS": "C1", "K=1, no TIS": "C2", "K=1, segments": "C3"}[side]
        label = side if seed == args.seeds[0] else None
        axes[0].plot([p[0] for p in pts], [p[2] for p in pts], color=color, label=label, alpha=0.8)
        axes[1].plot([p[1] for p in pts], [p[2] for p in pts], color=color, label=label, alpha=0.8)
    for ax, xlabel in zip(axes, ("step", "wall-clock seconds")):
        ax.set(xlabel=xlabel, ylabel="held-out accuracy (T=1)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=90)
    print(f"\ncurves: {args.png}")


def val_steps(runs) -> list[int]:
    return [m["step"] for m in next(iter(runs.values())) if "val/acc" in m]


def acc_at(metrics: list[dict], step: int) -> float:
    return next(m["val/acc"] for m in metrics if m["step"] == step and "val/acc" in m)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--steps", type=int, default=12)
    ln = sub.add_parser("learning")
    ln.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ln.add_argument("--steps", type=int, default=40)
    ln.add_argument("--val_every", type=int, default=10)
    ln.add_argument("--sides", nargs="+", default=list(SIDES)[:3], choices=list(SIDES))
    ln.add_argument("--png", default=os.path.join(ROOT, "bench", "overlap.png"))
    tl = sub.add_parser("tail")
    tl.add_argument("--steps", type=int, default=12)
    tl.add_argument("--segment_tokens", type=int, nargs="+", default=[16, 32, 64])
    tl.add_argument("--dynamic_sampling", nargs="+", default=["true", "false"])
    args = parser.parse_args()
    {"throughput": throughput, "learning": learning, "tail": tail}[args.what](args)
