"""The CPU demo's base model: a tiny Qwen2 and its tokenizer, built in code, then
briefly pre-trained (supervised) on the synthetic task so that RL has something
to improve. Nothing comes from a hub.

The pre-training data is deliberately sloppy: in `noise` of the worked solutions
one intermediate result is off by a little, and the rest follows from the wrong
value. The model learns the right method with a spread-out distribution over
results, like a base model that can solve a problem but does not do so reliably:
at temperature 1 it solves some held-out problems, not most, and outcome reward
alone can teach it to be reliable.

    python -m demo.base_model --out .cache/base-model
    python -m demo.base_model --task chain --out .cache/base-model-chain   # bench/ablation.py --task chain
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import data_prep

# A byte-level BPE over exactly what the task writes, built as transformers'
# Qwen2Tokenizer: that is the class AutoTokenizer and vLLM pick for a qwen2 model,
# whatever the saved tokenizer says, so the model is read back as it was trained.
WORDS = ["What", "Ġis", "Answer"]  # byte-level: "Ġ" is a space, "Ċ" a newline
CHARS = [*"0123456789+-*=?:", "Ġ", "Ċ", *sorted(set("".join(WORDS)) - {"Ġ"})]
SPECIALS = ["<pad>", "<eos>"]
# The DAPO prompt's fixed text is one token each side: the tiny model spends no
# compute on 60 words of instructions it cannot read anyway.
TEMPLATE_TOKENS = [data_prep.PROMPT_PREFIX, data_prep.PROMPT_SUFFIX]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '\n' }}{% endif %}")


def build_tokenizer():
    from transformers import Qwen2Tokenizer
    merges = [(w[:i], w[i]) for w in WORDS for i in range(1, len(w))]
    tokens = SPECIALS + CHARS + [a + b for a, b in merges]
    tokenizer = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               unk_token=None, bos_token=None, eos_token="<eos>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


MAX_POSITIONS = 256  # the demo model's context: prompt + response


def build_model(tokenizer, hidden: int = 128, layers: int = 2, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=32 * math.ceil(len(tokenizer) / 32), hidden_size=hidden,
        intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id)
    return Qwen2ForCausalLM(config)


def sloppy_solution(row: dict, rng: random.Random, noise: float) -> str:
    """The row's worked solution; with probability `noise` one step's result is off
    by 1-9 and every later step uses the wrong value."""
    solution = row["extra_info"]["solution"]
    if rng.random() >= noise:
        return solution
    steps = [re.fullmatch(r"(-?\d+)([-+*])(-?\d+)=(-?\d+)", s).groups() for s in solution.split("\n")[:-1]]
    k = rng.randrange(len(steps))
    out, wrong = [], None
    for j, (a, op, b, value) in enumerate(steps):
        if j > k:  # the previous result is one of this step's operands: use the wrong one
            a, b = (wrong, b) if a == steps[j - 1][3] else (a, wrong)
        value = OPS[op](int(a), int(b)) + (rng.choice([-1, 1]) * rng.randint(1, 9) if j == k else 0)
        wrong = str(value)
        out.append(f"{a}{op}{b}={value}")
    return "\n".join(out + [f"Answer: {wrong}"])


CHAIN_SHORTCUT, CHAIN_VERBOSE = 0.15, 0.1  # the chain task's pre-training mix, besides the wrong steps


def chain_solution(row: dict, rng: random.Random, noise: float) -> str:
    """The chain task's mix: in CHAIN_SHORTCUT of the solutions a guessed answer with no
    working (short, off by -9 to +9: right one time in 19), in CHAIN_VERBOSE every step
    written twice (long: past the length budget for long chains), otherwise sloppy_solution.
    RL has a length to find: write the steps, once."""
    draw = rng.random()
    if draw < CHAIN_SHORTCUT:
        return f"Answer: {int(row['answer']) + rng.randint(-9, 9)}"
    if draw < CHAIN_SHORTCUT + CHAIN_VERBOSE:
        *steps, answer = row["extra_info"]["solution"].split("\n")
        return "\n".join([step for step in steps for _ in range(2)] + [answer])
    return sloppy_solution(row, rng, noise)


SOLUTIONS = {"synthetic": sloppy_solution, "chain": chain_solution}  # data_prep's tasks


def encode(tokenizer, row: dict, solution: str) -> tuple[list[int], int]:
    """Token ids of prompt + solution + eos, and the prompt's length."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids)


def pretrain(model, tokenizer, rows, steps: int, noise: float, batch_size: int = 64,
             lr: float = 2e-3, seed: int = 0, log_every: int = 100, task: str = "synthetic") -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = [encode(tokenizer, r, SOLUTIONS[task](r, rng, noise))
                 for r in rng.sample(rows, batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        for i, (ids, prompt_len) in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
        loss = model(input_ids=input_ids, attention_mask=(labels != -100) | (input_ids != tokenizer.pad_token_id),
                     labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            print(f"pretrain step {step:5d} | loss {loss.item():.4f} | {time.time() - t0:.0f}s", flush=True)


def ensure_base_model(out_dir: str, steps: int = 2000, noise: float = 0.25, seed: int = 0,
                      hidden: int = 128, layers: int = 2, task: str = "synthetic") -> str:
    """Build and pre-train the base model for `task` (data_prep's synthetic tasks) unless
    `out_dir` already holds one. Written aside and renamed into place, so an interrupted
    build is never mistaken for a model."""
    recipe = {"steps": steps, "noise": noise, "seed": seed, "hidden": hidden, "layers": layers}
    recipe |= {"task": task} if task != "synthetic" else {}  # the demo's caches stay valid
    marker = os.path.join(out_dir, "base_model.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == recipe:
                return out_dir
        print(f"{out_dir} was built with another recipe: rebuilding", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden, layers, seed)
    print(f"building the base model: {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k "
          f"parameters, {steps} supervised steps, noise {noise}, task {task}", flush=True)
    pretrain(model, tokenizer, data_prep.load_rows(f"{task}:train"), steps, noise, seed=seed, task=task)
    tmp = out_dir.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "base_model.json"), "w") as f:
        json.dump(recipe, f)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".cache/base-model")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=sorted(SOLUTIONS), default="synthetic")
    args = parser.parse_args()
    print(ensure_base_model(args.out, args.steps, args.noise, args.seed, task=args.task))
