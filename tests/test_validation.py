"""Bad input ends before any work starts, in one line naming the culprit: every field of
Config and every flag of eval/evaluate.py walked with a bad value; the cases a new user
meets from the command line; a bad data row in a multi-process run."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from eval.evaluate import main as evaluate_main, make_parser
from train_dapo import Config, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD = {  # one bad value for every field that has one
    "seed": "-1", "total_steps": "0", "wandb_mode": "maybe", "wandb_project": "", "save_every": "0",
    "save_every_min": "-1", "keep_checkpoints": "0", "submit": "perhaps", "slurm_time_min": "0",
    "slurm_signal_lead_s": "70000", "slurm_gpus_per_node": "-1", "slurm_cpus_per_task": "0", "slurm_mem": "lots",
    "slurm_nodes": "0", "slurm_max_timeouts": "-1", "nproc_per_node": "0", "rollout_nodes": "-1",
    "weight_sync_bucket_mb": "0", "model_path": "/nonexistent/dir", "train_data": "/nonexistent/train.jsonl",
    "val_data": "missing/val.parquet", "max_prompt_len": "300", "max_response_len": "0", "compute_dtype": "float8",
    "prompts_per_step": "0", "group_size": "1", "temperature": "0", "top_p": "1.5", "per_request_seeds": "perhaps", "gen_prompts_per_round": "0",
    "max_gen_rounds": "0", "reward_workers": "-1", "dtype": "float8", "tensor_parallel_size": "0",
    "gpu_memory_utilization": "1.5", "max_staleness": "-1", "tis": "sometimes", "tis_cap": "0.5", "eps_low": "1.0", "eps_high": "-0.1", "dual_clip_c": "0.5",
    "loss_agg_mode": "foo", "dynamic_sampling": "perhaps", "overlong_filtering": "perhaps",
    "overlong_punishment": "perhaps", "overlong_cache_len": "48", "lr": "0", "warmup_steps": "-1",
    "weight_decay": "-0.1", "grad_clip": "0", "mini_batch_size": "7", "gradient_checkpointing": "perhaps",
    "micro_batch_tokens": "10", "val_every": "0", "val_samples": "0", "val_temperature": "-1", "val_top_p": "0",
    "val_max_problems": "-1", "stall_timeout_min": "0", "segment_tokens": "-1", "max_token_staleness": "-2",
}
FREE = {"run_dir", "slurm_partition", "slurm_account", "slurm_constraint", "base_model_dir"}  # any text will do


def test_every_field_has_a_bad_value_or_takes_any():
    assert set(BAD) | FREE == {f.name for f in dataclasses.fields(Config)}


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_value_is_named_in_one_line(field, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config([f"--{field}", BAD[field], "--run_dir", "unused"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and f"--{field}" in err, err


EVAL_BAD = {"n": "0", "temperature": "-1", "top-p": "0", "max-tokens": "0", "max-model-len": "-5", "dtype": "float8",
            "tensor-parallel-size": "-1", "seed": "-1", "timeout-min": "0", "cpus-per-task": "0", "gpus": "-1",
            "model": "/nonexistent/model.bin", "data": "/nonexistent/aime.jsonl", "submit": None}
EVAL_FREE = {"help", "out", "partition", "account"}


def test_every_eval_flag_is_walked():
    flags = {max(a.option_strings, key=len).lstrip("-") for a in make_parser()._actions}
    assert set(EVAL_BAD) | EVAL_FREE == flags


@pytest.mark.parametrize("flag", sorted(EVAL_BAD))
def test_a_bad_eval_flag_is_named_in_one_line(flag, tiny_model_dir, tmp_path, capsys):
    args = {"model": tiny_model_dir, "data": "synthetic:val", "out": str(tmp_path)}
    if EVAL_BAD[flag] is not None:
        args[flag] = EVAL_BAD[flag]
    argv = [a for k, v in args.items() for a in (f"--{k}", v)] + (["--submit"] if flag == "submit" else [])
    with pytest.raises(SystemExit) as e:
        evaluate_main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and f"--{flag}" in err, err


@pytest.mark.parametrize("flags, culprit", [
    (["--prompts_per_step", "0"], "--prompts_per_step 0: must be at least 1"),
    (["--model_path", "/nonexistent/dir"], "--model_path /nonexistent/dir: no such directory"),
    (["--dtype", "float8"], "--dtype 'float8': expected one of"),
    (["--max_prompt_len", "300"], "exceeds the model's context of 256 tokens"),
    (["--train_data", "/nonexistent/train.jsonl"], "--train_data: /nonexistent/train.jsonl: no such file"),
    (["--nproc_per_node", "3", "--rollout_nodes", "1", "--val_data", "/nonexistent/v.jsonl"], "--val_data"),
])
def test_the_command_line_stops_in_one_line_before_anything_starts(flags, culprit, tmp_path):
    proc = subprocess.run([sys.executable, "train_dapo.py", *flags, "--run_dir", str(tmp_path / "run")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and culprit in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_a_bad_row_in_a_multi_process_run_is_one_line_from_trainer_0(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": 1, "problem": "What is 1+1?", "answer": "2"}) + "\n"
                    + json.dumps({"id": 2, "problem": "What is 2+2?"}) + "\n")
    proc = subprocess.run([sys.executable, "train_dapo.py", "--nproc_per_node", "3", "--rollout_nodes", "1",
                           "--model_path", tiny_model_dir, "--train_data", str(data), "--val_data", "",
                           "--wandb_mode", "disabled", "--run_dir", str(tmp_path / "run")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and f"{data}: row 1: missing field 'answer'" in errors[0], errors


def bad_inputs(tmp_path):
    """Files a user gets wrong: an existing file, an empty data file, a csv, a directory whose
    config.json is no model's."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "problems.csv").write_text("problem,answer\n")
    (tmp_path / "not.parquet").write_text("problem,answer\n")
    (tmp_path / "no_type").mkdir()
    (tmp_path / "no_type" / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    return tmp_path


# (command after `python`, what the one line must name); {d}: the bad inputs' folder, {m}: the tiny model
README_COMMANDS = [
    ("train_dapo.py --model_path {m} --run_dir {d}/a_file", "--run_dir '{d}/a_file': is a file, not a directory"),
    ("train_dapo.py --model_path {m} --train_data {d}/empty.jsonl --run_dir {d}/out",
     "--train_data: {d}/empty.jsonl: no rows"),
    ("train_dapo.py --model_path {m} --val_data {d}/not.parquet --run_dir {d}/out",
     "--val_data: {d}/not.parquet: not a parquet file"),
    ("train_dapo.py --model_path {d}/no_type --run_dir {d}/out",
     "--model_path {d}/no_type: its config.json is not one transformers can read"),
    ("data_prep.py convert {d}/missing.jsonl --out {d}/out", "{d}/missing.jsonl: no such file"),
    ("data_prep.py convert {d}/problems.csv --out {d}/out", "{d}/problems.csv: unknown format"),
    ("data_prep.py convert {d}/empty.jsonl --out {d}/out", "{d}/empty.jsonl: no rows"),
    ("data_prep.py synthetic --num-val 0 --out {d}/out", "--num-val 0: must be at least 1"),
    ("-m eval.evaluate --model {m} --data {d}/empty.jsonl --out {d}/out", "--data: {d}/empty.jsonl: no rows"),
    ("-m eval.evaluate --model {d}/no_type --data synthetic:val --out {d}/out",
     "--model {d}/no_type: no model config could be read"),
    ("slurm/memory_budget.py --model_path {d}/no_type", "--model_path '{d}/no_type': its config.json has no hidden_size"),
    ("scripts/gpu_smoke.py --layers 0 --out {d}/out", "--layers 0: must be at least 1"),
]


@pytest.mark.parametrize("command, culprit", README_COMMANDS, ids=[c.split(" --")[0] + f"-{i}"
                                                                 for i, (c, _) in enumerate(README_COMMANDS)])
def test_every_readme_command_names_bad_input_in_one_line(command, culprit, tiny_model_dir, tmp_path):
    d = bad_inputs(tmp_path)
    argv = command.format(d=d, m=tiny_model_dir).split()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": ROOT})
    err = proc.stderr.strip()
    assert proc.returncode != 0 and len(err.splitlines()) == 1, err[-3000:]
    assert culprit.format(d=d) in err, err
    assert not (d / "out").exists()  # nothing written, nothing started
