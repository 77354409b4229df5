"""Datasets for DAPO, all in one row shape.

Reads DAPO-Math-17k (hub name or a local parquet/jsonl in the published schema),
AIME 2024 in DAPO's parquet form (30 problems x 32 copies) or as plain jsonl with
`problem`/`answer`, and makes the synthetic tasks: the CPU demo's arithmetic
(`synthetic:`) and chains of additions whose worked answers vary in length (`chain:`).
Everything is deduplicated by prompt. Everything written is jsonl in the
DAPO-Math-17k schema:

    {"data_source": str, "prompt": [{"role": "user", "content": <DAPO template>}],
     "ability": "MATH", "reward_model": {"ground_truth": str, "style": "rule"},
     "extra_info": {"index": ...}}

    python data_prep.py synthetic --out data/            # train.jsonl + val.jsonl
    python data_prep.py synthetic --task chain --out data/chain/
    python data_prep.py convert BytedTsinghua-SIA/DAPO-Math-17k --out data/dapo-math.jsonl
    python data_prep.py convert aime24.parquet --out data/aime24.jsonl
"""
import argparse
import json
import os
import random

PROMPT_PREFIX = (
    "Solve the following math problem step by step. The last line of your response "
    "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
    "to the problem.\n\n"
)
PROMPT_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


class DataError(ValueError):
    """A malformed dataset file or row; the message names the file, the row and the field."""


def make_prompt(problem: str) -> str:
    return PROMPT_PREFIX + problem + PROMPT_SUFFIX


def problem_from_prompt(prompt: str) -> str:
    return prompt.removeprefix(PROMPT_PREFIX).removesuffix(PROMPT_SUFFIX)


# ----------------------------------------------------------------------------- synthetic task
# "What is 48*7+34?" -> "48*7=336\n336+34=370\nAnswer: 370". Difficulty = number of
# operators (1 or 2); `*` takes one single-digit operand so a 2-layer model can learn it.

def synthetic_problem(rng: random.Random) -> tuple[str, str, list[str], int]:
    """(problem, answer, working steps in precedence order, difficulty)."""
    num_ops = rng.choice((1, 2))
    ops = [rng.choice("+-*") for _ in range(num_ops)]
    terms = [str(rng.randint(10, 99))] + [str(rng.randint(2, 9) if op == "*" else rng.randint(10, 99))
                                          for op in ops]
    tokens = [terms[0]] + [t for pair in zip(ops, terms[1:]) for t in pair]
    steps = []
    for precedence in ("*", "+-"):  # evaluate `*` first, then + and - left to right
        i = 1
        while i < len(tokens):
            if tokens[i] in precedence:
                a, op, b = tokens[i - 1:i + 2]
                value = str(eval(f"{a}{op}{b}"))  # two integer literals: safe
                steps.append(f"{a}{op}{b}={value}")
                tokens[i - 1:i + 2] = [value]
            else:
                i += 2
    problem = "What is " + "".join(t for pair in zip(terms, ops + [""]) for t in pair) + "?"
    return problem, tokens[0], steps, num_ops


# "What is 23+41-17+9?" -> "23+41=64\n64-17=47\n47+9=56\nAnswer: 56": 1 to CHAIN_MAX_OPS
# additions and subtractions of two-digit numbers, left to right, a written step a line (about
# 11 tokens each). The worked answer takes 12 to 107 tokens; a long chain is hard to get right
# without writing it out, so length varies, and matters.
CHAIN_MAX_OPS = 8


def chain_problem(rng: random.Random) -> tuple[str, str, list[str], int]:
    """(problem, answer, working steps, difficulty: the number of operations)."""
    num_ops = rng.randint(1, CHAIN_MAX_OPS)
    terms = [rng.randint(10, 99) for _ in range(num_ops + 1)]
    ops = [rng.choice("+-") for _ in range(num_ops)]
    steps, value = [], terms[0]
    for op, term in zip(ops, terms[1:]):
        result = value + term if op == "+" else value - term
        steps.append(f"{value}{op}{term}={result}")
        value = result
    problem = f"What is {terms[0]}" + "".join(f"{op}{term}" for op, term in zip(ops, terms[1:])) + "?"
    return problem, str(value), steps, num_ops


TASKS = {"synthetic": (synthetic_problem, "synthetic-arith"), "chain": (chain_problem, "synthetic-chain")}


def synthetic_rows(n: int, seed: int, exclude: set[str] = frozenset(), task: str = "synthetic") -> list[dict]:
    """n distinct problems of `task` (none in `exclude`), rows in the DAPO schema; the worked
    solution rides along in extra_info for the base model's supervised pre-training."""
    make, source = TASKS[task]
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < n:
        problem, answer, steps, difficulty = make(rng)
        if problem in seen:
            continue
        seen.add(problem)
        solution = "\n".join(steps + [f"Answer: {answer}"])
        rows.append(dapo_row(source, problem, answer, len(rows), difficulty=difficulty, solution=solution))
    return rows


def synthetic_splits(num_train: int = 20000, num_val: int = 200, seed: int = 0, task: str = "synthetic") -> dict:
    val = synthetic_rows(num_val, seed + 1, task=task)
    train = synthetic_rows(num_train, seed, exclude={problem_of(r) for r in val}, task=task)
    return {"train": train, "val": val}


# ----------------------------------------------------------------------------- the one schema

def dapo_row(source: str, problem: str, answer: str, index, **extra) -> dict:
    return {"data_source": source,
            "prompt": [{"role": "user", "content": make_prompt(problem)}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(answer), "style": "rule"},
            "extra_info": {"index": index, **extra}}


def problem_of(row: dict) -> str:
    return problem_from_prompt(row["prompt"][0]["content"])


def flat(row: dict) -> dict:
    """The fields the trainer and eval use: id, problem, prompt, answer (+ extra_info)."""
    prompt = row["prompt"][-1]["content"]
    return {"id": str(row["extra_info"]["index"]), "problem": problem_from_prompt(prompt),
            "prompt": prompt, "answer": row["reward_model"]["ground_truth"],
            "extra_info": row["extra_info"]}


# ----------------------------------------------------------------------------- reading

def read_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if path.endswith(".jsonl"):
        records = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: row {i}: not valid JSON ({e})") from None
        return records
    raise DataError(f"{path}: unknown format (expected .parquet or .jsonl)")


def require(record, dotted: str, path: str, i: int):
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or value.get(key) is None:
            raise DataError(f"{path}: row {i}: missing field '{dotted}'")
        value = value[key]
    return value


def to_dapo_row(record: dict, path: str, i: int) -> dict:
    """Accept the DAPO schema, or plain {problem, answer} (AIME jsonl); return the DAPO schema."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: row {i}: expected an object, got {type(record).__name__}")
    if "prompt" in record:
        prompt = require(record, "prompt", path, i)
        if not (isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict)
                and isinstance(prompt[-1].get("content"), str)):
            raise DataError(f"{path}: row {i}: field 'prompt' must be a chat list of "
                            "{role, content} messages")
        answer = require(record, "reward_model.ground_truth", path, i)
        row = dapo_row(record.get("data_source", os.path.basename(path)), "", str(answer), i)
        row["prompt"] = [{"role": m.get("role", "user"), "content": m["content"]} for m in prompt]
        row["extra_info"] |= record.get("extra_info") or {}  # kept verbatim, as published
        return row
    problem = require(record, "problem", path, i)
    answer = require(record, "answer", path, i)
    index = record.get("id", record.get("ID", i))
    return dapo_row(os.path.basename(path), str(problem), str(answer).strip(), index)


def dedup(rows: list[dict]) -> list[dict]:
    """Keep the first row of each distinct prompt (DAPO-Math-17k repeats each ~100 times)."""
    seen, out = set(), []
    for row in rows:
        key = row["prompt"][-1]["content"]
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def resolve_files(source: str) -> list[str]:
    """A local file, or a hub dataset name (needs a network) -> its parquet/jsonl files."""
    if os.path.exists(source) or source.endswith((".parquet", ".jsonl")):
        return [source]
    from huggingface_hub import snapshot_download
    root = snapshot_download(source, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl"])
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if f.endswith((".parquet", ".jsonl")))
    if not files:
        raise DataError(f"{source}: the dataset has no parquet or jsonl files")
    return files


def check_source(source: str) -> None:
    """What can be known of `source` reading no further than a file's first row: a DataError if
    it names a local file that is not there or holds no row, or a synthetic split that does
    not exist."""
    task, colon, split = source.partition(":")
    if colon and task in TASKS:
        if split not in ("train", "val"):
            raise DataError(f"{source}: unknown split '{split}' (expected train or val)")
    elif source.endswith((".parquet", ".jsonl")) or looks_local(source):
        path = os.path.expanduser(source)
        if not os.path.exists(path):
            raise DataError(f"{source}: no such file")
        if os.path.isfile(path) and not has_rows(path):
            raise DataError(f"{source}: no rows (an empty file)")


def looks_local(path: str) -> bool:
    """A path on this machine, never a hub name (owner/name)."""
    return path.startswith(("/", "./", "../", "~"))


def has_rows(path: str) -> bool:
    """Whether a data file holds a row, read no further than its first (a parquet's footer)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(path).metadata.num_rows > 0
        except Exception as e:  # pyarrow's errors for a file that is not parquet
            raise DataError(f"{path}: not a parquet file ({e})") from None
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(line.strip() for line in f)


def load_dapo_rows(source: str) -> list[dict]:
    """Rows in the DAPO schema, deduplicated. `source` is a file, a hub name, or a synthetic
    task's split, made in memory: 'synthetic:train' / 'synthetic:val' (the demo's), 'chain:...'."""
    task, colon, split = source.partition(":")
    if colon and task in TASKS:
        check_source(source)
        return synthetic_splits(task=task)[split]
    files = resolve_files(source)
    for path in files:  # an empty or unreadable file is named before any is read
        check_source(path)
    rows = [to_dapo_row(r, path, i) for path in files for i, r in enumerate(read_records(path))]
    return dedup(rows)


def load_rows(source: str) -> list[dict]:
    """Rows with id, problem, prompt (full DAPO user prompt), answer (str); deduplicated."""
    return [flat(r) for r in load_dapo_rows(source)]


def write_rows(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class FlagParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the flag, not a page of usage first (every
    command line of the project uses it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=FlagParser)
    syn = sub.add_parser("synthetic", help="write the demo task's train.jsonl and val.jsonl")
    syn.add_argument("--out", default="data")
    syn.add_argument("--num-train", type=int, default=20000)
    syn.add_argument("--num-val", type=int, default=200)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--task", choices=sorted(TASKS), default="synthetic")
    conv = sub.add_parser("convert", help="read a file or hub dataset, dedup, write jsonl")
    conv.add_argument("source")
    conv.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "synthetic":
            for flag in ("num_train", "num_val"):
                if getattr(args, flag) < 1:
                    raise DataError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
            for split, rows in synthetic_splits(args.num_train, args.num_val, args.seed, args.task).items():
                write_rows(rows, os.path.join(args.out, f"{split}.jsonl"))
                print(f"{split}: {len(rows)} rows -> {os.path.join(args.out, split + '.jsonl')}")
        else:
            rows = load_dapo_rows(args.source)
            write_rows(rows, args.out)
            print(f"{len(rows)} unique prompts -> {args.out}")
    except DataError as e:  # nothing was written: rows are written only once all are read
        parser.error(str(e))


if __name__ == "__main__":
    main()
