"""Memory of one trainer GPU, from train_dapo's config and the model's shape: the table of
slurm/qwen2.5-32b.md, printed from the flags so that it follows them.

    python slurm/memory_budget.py --preset paper --model_path Qwen/Qwen2.5-32B \\
        --slurm_nodes 16 --nproc_per_node 8 --rollout_nodes 8      # the 32B page's table
    python slurm/memory_budget.py --model_path DIR --micro_batch_tokens 49152 ...

The shape comes from DIR/config.json, or for a hub name without a local copy from the
table below. Arithmetic, not a measurement: scripts/gpu_smoke.py compares it with the
peak measured on a GPU at a small shape. Terms: FSDP2 over the trainers (master weights,
gradients and AdamW moments sharded, fp32); the root unit (embedding, final norm, LM head)
stays gathered through forward and backward; blocks are gathered one at a time plus one
prefetched; activations assume flash-attention (no T x T) and Liger's SwiGLU (gate and up
kept, not their product).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_dapo  # noqa: E402

KNOWN_SHAPES = {  # config.json fields of hub models, for machines that have not downloaded them
    "Qwen/Qwen2.5-32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                             num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "Qwen/Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "Qwen/Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen2.5-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size")
GB = 1e9  # decimal, as the tables print


def model_shape(model_path: str) -> dict:
    config = os.path.join(model_path, "config.json")
    if os.path.exists(config):
        with open(config) as f:
            shape = json.load(f)
        missing = [k for k in SHAPE_FIELDS if k not in shape]
        if missing:
            raise SystemExit(f"--model_path {model_path!r}: its config.json has no {', '.join(missing)}: "
                             "not a decoder model's shape")
        return shape
    if model_path in KNOWN_SHAPES:
        return KNOWN_SHAPES[model_path]
    raise SystemExit(f"--model_path {model_path!r}: no config.json there and not one of {sorted(KNOWN_SHAPES)}")


def trainer_count(cfg: train_dapo.Config) -> int:
    if cfg.slurm_nodes > 1:
        return (cfg.slurm_nodes - cfg.rollout_nodes) * cfg.nproc_per_node
    return cfg.nproc_per_node - cfg.rollout_nodes


def trainer_budget(cfg: train_dapo.Config, shape: dict, trainers: int, compute_bytes: int = 2) -> list[tuple[str, float]]:
    """(what, bytes) per trainer GPU; the last row is the peak: the steady state plus the
    larger of the two phases that cannot overlap (the LM head's fused loss, a block's backward)."""
    H, I, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    d = H // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    block = H * (q + 2 * kv) + (q + 2 * kv) + q * H + 3 * H * I + 2 * H      # attention (with biases), MLP, norms
    root = V * H * (1 if shape.get("tie_word_embeddings") else 2) + H          # embedding, LM head, final norm
    params, c, T, chunk = L * block + root, compute_bytes, cfg.micro_batch_tokens, train_dapo.LOGITS_CHUNK
    responses, width = cfg.prompts_per_step * cfg.group_size, cfg.max_response_len
    # what a block's backward reads: norms, q/k/v, attention out, projections; the MLP's gate and
    # up (kept by Liger's SwiGLU) and their product (kept by down_proj for its weight's gradient)
    one_block_acts = c * T * (6 * H + 2 * q + 2 * kv + 3 * I)
    steady = [
        ("fp32 master weights (sharded)", 4 * params / trainers),
        ("fp32 gradients (sharded)", 4 * params / trainers),
        ("AdamW moments, 2 x fp32 (sharded)", 8 * params / trainers),
        ("root unit gathered in compute dtype (embedding, LM head): kept through backward", c * root),
        ("two blocks gathered (the current one, one prefetched)", 2 * c * block),
        ("batch: mask and pi_old log-probs, fp32 [responses x L_max], on every trainer", 2 * 4 * responses * width),
        ("block inputs kept for recompute (gradient checkpointing)" if cfg.gradient_checkpointing else
         "every block's activations (no gradient checkpointing)",
         L * c * T * H if cfg.gradient_checkpointing else L * one_block_acts),
    ]
    head = [
        ("  head: hidden states, their gradient (compute dtype)", 3 * c * T * H),
        ("  head: LM-head gradient accumulator, fp32, and its cast", (4 + c) * V * H),
        ("  head: the LM head's weight cast to fp32 in each chunk's backward", 4 * V * H),
        (f"  head: {chunk}-row chunk of logits, log-softmax, probabilities, fp32", 3 * 4 * chunk * V),
    ]
    block_backward = [
        ("  block backward: the recomputed block's activations and their gradients",
         2 * one_block_acts if cfg.gradient_checkpointing else one_block_acts),
        ("  block backward: its unsharded gradient, then fp32 for the reduce-scatter", (c + 4) * block),
        ("  block backward: the LM head's gradient, held until the root's reduce", c * V * H),
    ]
    phase, name = max((sum(b for _, b in head), "head"), (sum(b for _, b in block_backward), "block backward"))
    rows = steady + head + block_backward
    return rows + [(f"peak: steady state + the {name} phase (NCCL buffers, CUDA context and allocator slack "
                    "not counted: budget 5-8 GB more)", sum(b for _, b in steady) + phase)]


def print_budget(cfg: train_dapo.Config) -> None:
    shape, trainers = model_shape(cfg.model_path), trainer_count(cfg)
    rows = trainer_budget(cfg, shape, trainers)
    print(f"{cfg.model_path}: {trainers} trainer GPU(s), {cfg.micro_batch_tokens}-token micro-batches, "
          f"{cfg.prompts_per_step} x {cfg.group_size} responses up to {cfg.max_response_len} tokens, "
          f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}\n")
    print("| what | per trainer GPU |\n|---|---|")
    for what, nbytes in rows:
        print(f"| {what} | {nbytes / GB:.1f} GB |")


if __name__ == "__main__":
    print_budget(train_dapo.parse_config(sys.argv[1:] + ["--run_dir", "unused"], check_model=False))
