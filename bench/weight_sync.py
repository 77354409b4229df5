"""Weight sync, trainer -> rollout engine, against one raw torch.distributed broadcast of
the same bytes between the same two processes (gloo on CPU, as in a CPU run).

    python bench/weight_sync.py                 # a 56M-parameter Qwen2 (225 MB in fp32)
    python bench/weight_sync.py --hidden 256    # a quick look

Two processes, started by torchrun: a trainer (the driver) and a rollout process hosting
the vLLM engine. Both first time raw broadcasts of the model's bytes over the control
group; then the driver times train_dapo.sync_weights, which gathers, casts, broadcasts
bucket by bucket and has the engine reload in place, at two bucket sizes."""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REPEATS = 3


def build_model_dir(args, path: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from demo.base_model import build_tokenizer
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker(model_dir: str) -> None:
    import train_dapo
    from train_dapo import Config, resolve
    cfg = resolve(Config(model_path=model_dir, nproc_per_node=2, rollout_nodes=1, dtype="float32",
                         max_prompt_len=32, max_response_len=32, run_dir="unused"))
    cluster = train_dapo.join_cluster(cfg)
    policy = None
    size = torch.zeros(1, dtype=torch.long)
    if cluster.rank == 0:
        policy = train_dapo.build_or_load_policy(cfg, model_dir)
        size[0] = sum(p.numel() for p in policy.parameters())
    cluster.control.broadcast(size, 0).wait()
    flat = torch.zeros(int(size), dtype=torch.float32)
    raw = [timed(lambda: cluster.control.broadcast(flat, 0).wait()) for _ in range(REPEATS + 1)][1:]
    if cluster.rank == 1:
        return train_dapo.serve_rollouts(cfg, cluster)
    llm = train_dapo.RemoteEngines(cfg, cluster)
    rows = [("raw broadcast (baseline)", raw, None)]
    for bucket_mb in (256, 64, 16, 4):
        cfg.weight_sync_bucket_mb = bucket_mb
        times = [train_dapo.sync_weights(cfg, llm, policy)["time/sync"] for _ in range(REPEATS + 1)][1:]
        rows.append((f"sync_weights, {bucket_mb} MB buckets", times, len(train_dapo.sync_plan(
            policy.lm.state_dict(), torch.float32, bucket_mb * 2**20))))
    llm.stop()
    nbytes = flat.numel() * 4
    base = statistics.median(raw)
    print(f"\nweight sync, 1 trainer -> 1 vLLM engine, gloo: {flat.numel() / 1e6:.1f}M parameters, "
          f"{nbytes / 1e6:.0f} MB fp32; median of {REPEATS} after a warm-up\n")
    print("| path | buckets | seconds | GB/s | x raw broadcast |")
    print("|---|---|---|---|---|")
    for name, times, buckets in rows:
        t = statistics.median(times)
        print(f"| {name} | {buckets or 1} | {t:.3f} | {nbytes / t / 1e9:.2f} | {t / base:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    with tempfile.TemporaryDirectory() as model_dir:
        build_model_dir(args, model_dir)
        env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               os.path.abspath(__file__), "--worker", model_dir], env=env, capture_output=True, text=True)
        print(proc.stdout[proc.stdout.find("\nweight sync"):] if proc.returncode == 0 else proc.stderr[-4000:])
        sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
