"""Peak memory and time of one forward + backward of the log-prob and DAPO loss through
the LM head at Qwen2.5's vocabulary: full logits (naive); our chunked log-probs with the
loss after them (train_dapo.ChunkedLogProbs: old log-probs and entropy use it); our
fused loss, gradients made in the forward (train_dapo.FusedChunkedLoss: the update uses
it); Liger's fused linear GRPO loss. Each variant runs in a fresh process, since peak
RSS is a per-process number.

    python bench/logprob_memory.py                  # hidden 1024, vocab 151,936, 8 x 1024 tokens, fp32
    python bench/logprob_memory.py --tokens 1024    # a quick look
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS_LOW, EPS_HIGH = 0.2, 0.28


def inputs(args):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden, generator=g) / 4).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    old = -torch.rand(args.tokens, generator=g) * 10
    advantages = torch.randn(args.seqs, generator=g)
    return hidden, weight, labels, old, advantages


def run_variant(args):
    sys.path.insert(0, ROOT)
    from train_dapo import ChunkedLogProbs, FusedChunkedLoss, compute_policy_loss
    torch.set_num_threads(os.cpu_count())
    hidden, weight, labels, old, advantages = inputs(args)
    B, T = args.seqs, args.tokens // args.seqs
    mask = torch.ones(B, T)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.variant == "naive":
        log_p = torch.log_softmax(hidden @ weight.T, -1)                       # [N, V]
        logprobs = log_p.gather(-1, labels[:, None]).squeeze(-1)
        loss, _ = compute_policy_loss(logprobs.view(B, T), old.view(B, T), advantages, mask, EPS_LOW, EPS_HIGH)
    elif args.variant == "chunked":
        logprobs, _ = ChunkedLogProbs.apply(hidden, weight, labels, 1.0, args.chunk)
        loss, _ = compute_policy_loss(logprobs.view(B, T), old.view(B, T), advantages, mask, EPS_LOW, EPS_HIGH)
    elif args.variant == "fused":  # the trainer's update path: per-token loss terms, gradients in the forward
        per_token_adv = advantages.repeat_interleave(T)
        _, _, loss = FusedChunkedLoss.apply(hidden, weight, labels, 1.0, args.chunk, lambda lp, s, e: compute_policy_loss(
            lp[:, None], old[s:e, None], per_token_adv[s:e], mask.view(-1, 1)[s:e], EPS_LOW, EPS_HIGH, "token-mean",
            mask.sum())[0])
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=False, epsilon_low=EPS_LOW,
                                         epsilon_high=EPS_HIGH, loss_type="dapo")
        loss = liger(hidden.view(B, T, -1), weight, labels.view(B, T), mask, advantages,
                     old_per_token_logps=old.view(B, T))[0]
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": args.variant, "seconds": seconds, "peak_gb": peak / 2**20,
                      "above_inputs_gb": (peak - base) / 2**20, "loss": loss.item(),
                      "grad_hidden_norm": hidden.grad.norm().item()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=8 * 1024)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--variants", default="naive,chunked,fused,liger")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return run_variant(args)
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={getattr(args, k)}" for k in
                                                                  ("hidden", "vocab", "tokens", "seqs", "chunk")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{variant}: failed\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    naive = next((r for r in rows if r["variant"] == "naive"), rows[0])
    print(f"\nlog-prob + DAPO loss, forward + backward: hidden {args.hidden}, vocab {args.vocab}, "
          f"{args.seqs} x {args.tokens // args.seqs} tokens, fp32, {os.cpu_count()} CPU threads")
    print("| variant | seconds | x naive | peak RSS GB | above inputs GB | x naive | loss | grad norm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.1f} | {r['seconds'] / naive['seconds']:.2f} | {r['peak_gb']:.2f} | "
              f"{r['above_inputs_gb']:.2f} | {r['above_inputs_gb'] / naive['above_inputs_gb']:.2f} | "
              f"{r['loss']:.6f} | {r['grad_hidden_norm']:.6f} |")


if __name__ == "__main__":
    main()
