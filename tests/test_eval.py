import itertools
import json
import os
import subprocess
import sys

import pytest

from eval.evaluate import pass_at_k, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force_pass_at_k(outcomes, k):
    """Share of all k-subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in (1, 4, 7) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k([True] * c + [False] * (n - c), k), abs=1e-12)


def test_summary_of_known_outcomes():
    acc = [[False] * 4, [True, False, False, False], [False, True, True, False], [True] * 4]
    per_problem = [{"acc": a, "lengths": [10, 20, 30, 40], "truncated": [False, False, False, i == 3]}
                   for i, a in enumerate(acc)]
    s = summarize(per_problem, 4)
    assert s["avg@4"] == 7 / 16
    assert s["pass@k"][1] == pytest.approx(7 / 16)
    assert s["pass@k"][2] == pytest.approx((0 + 1 / 2 + 5 / 6 + 1) / 4)
    assert s["pass@k"][4] == pytest.approx(3 / 4)
    assert s["response_length"] == {"mean": 25.0, "max": 40, "p50": 25.0}
    assert s["truncated_share"] == 1 / 16


def run_eval(*args):
    env = os.environ | {"PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "eval.evaluate", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_evaluate_the_tiny_model_end_to_end(tiny_model_dir, tmp_path):
    data = tmp_path / "val.jsonl"
    # odd problems: a gold the tiny model cannot write (no backslash in its vocabulary), wrong by construction
    data.write_text("\n".join(json.dumps({"id": i, "problem": f"What is {10 + i}+{20 + i}?",
                                          "answer": str(30 + 2 * i) if i % 2 == 0 else "\\pi"}) for i in range(12)))
    out = tmp_path / "report"
    proc = run_eval("--model", tiny_model_dir, "--data", str(data), "--n", "4", "--max-tokens", "32",
                    "--top-p", "1.0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    per_problem = result["per_problem"]
    assert len(per_problem) == 12 and all(len(p["acc"]) == 4 for p in per_problem)
    assert result["summary"]["avg@4"] == pytest.approx(sum(map(sum, (p["acc"] for p in per_problem))) / 48)
    # each sample against its known answer, checked here as integers (how many are right depends on
    # the model, so on the CPU that trained it: test_e2e compares eval with the trainer's validation
    # on golds where right and wrong both occur by construction)
    truth = [[p["preds"][k] is not None and p["preds"][k].strip().lstrip("-").isdigit() and p["answer"] != "\\pi"
              and int(p["preds"][k]) == int(p["answer"]) for k in range(4)] for p in per_problem]
    assert [p["acc"] for p in per_problem] == truth
    assert result["summary"]["response_length"]["mean"] > 5   # it writes working, not nothing
    assert (out / "pass_at_k.png").stat().st_size > 1000
    assert len((out / "per_problem.tsv").read_text().splitlines()) == 13
    assert "avg@4" in proc.stdout


@pytest.mark.parametrize("make,message", [
    (lambda p: p.mkdir(), "not a model directory"),
    (lambda p: p.write_text("x"), "not a directory"),
])
def test_not_a_model_is_named(tmp_path, make, message):
    target = tmp_path / "m"
    make(target)
    proc = run_eval("--model", str(target), "--data", "synthetic:val")
    assert proc.returncode != 0 and message in proc.stderr and str(target) in proc.stderr


def test_unknown_data_format_is_named(tiny_model_dir, tmp_path):
    bad = tmp_path / "problems.csv"
    bad.write_text("problem,answer\n")
    proc = run_eval("--model", tiny_model_dir, "--data", str(bad))
    assert proc.returncode != 0 and "unknown format" in proc.stderr and str(bad) in proc.stderr


@pytest.mark.slurm
def test_evaluation_as_a_submitit_job(tiny_model_dir, tmp_path, local_slurm):
    """Through the local Slurm the tests start (conftest.py): same code, same report."""
    out = tmp_path / "report"
    proc = run_eval("--model", tiny_model_dir, "--data", "synthetic:val", "--n", "2", "--max-tokens", "32",
                    "--submit", "--gpus", "0", "--cpus-per-task", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted job" in proc.stdout and "(slurm)" in proc.stdout and "done: avg@2" in proc.stdout
    assert json.loads((out / "result.json").read_text())["summary"]["num_problems"] == 200


def test_a_prompt_past_the_context_is_named_before_the_engine_starts(tiny_model_dir, tmp_path):
    """The demo model has 256 positions: a long problem with 32 new tokens cannot fit."""
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"p{i}", "problem": f"What is {i}+1? " * (4 if i < 2 else 60),
                                          "answer": str(i + 1)}) for i in range(5)))
    proc = run_eval("--model", tiny_model_dir, "--data", str(data), "--max-tokens", "32")
    assert proc.returncode != 0 and "problem 'p2' and 2 more of 5" in proc.stderr, proc.stderr[-2000:]
    assert "exceeds the context of 256 tokens" in proc.stderr and "Traceback" not in proc.stderr


def test_a_job_must_say_how_many_gpus_it_needs(tiny_model_dir):
    proc = run_eval("--model", tiny_model_dir, "--data", "synthetic:val", "--submit")
    assert proc.returncode != 0 and "--submit needs --gpus N" in proc.stderr


@pytest.mark.parametrize("name, uses", [("evaluate.py", "reward"), ("export.py", "torch.distributed.checkpoint")])
def test_eval_never_imports_the_trainer(name, uses):
    """The dependency runs one way: train_dapo.py uses eval/, not back."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "eval", name)).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "train_dapo" not in imported and uses in imported


def test_seeded_samples_of_prompts_split_across_engine_steps_work_on_cpu(tiny_model_dir):
    """vLLM rewinds a seeded request's random generator after a step that computed only part
    of its prompt (chunked prefill), which a CPU generator cannot do ("CPU Generator does not
    use offset"): 60 chain prompts x 8 seeded samples fill more than one step's token budget.
    make_engine keeps prompts whole on CPU; the seeded samples repeat exactly."""
    from vllm import SamplingParams

    import data_prep
    from eval.evaluate import make_engine, prompt_token_ids
    llm, tokenizer = make_engine(tiny_model_dir, 192, "float32", seed=0)
    rows = data_prep.load_rows("chain:val")[:60]
    prompts = [{"prompt_token_ids": prompt_token_ids(tokenizer, r["prompt"])} for r in rows]
    params = [SamplingParams(n=8, temperature=1.0, max_tokens=128, seed=i) for i in range(len(prompts))]

    def sample():
        return [[list(c.token_ids) for c in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]
    first = sample()
    assert sample() == first and sum(len(ids) for group in first for ids in group) > 60 * 8 * 5
