"""The real thing, small: DAPO steps on the tiny model with vLLM on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data_prep
from eval.evaluate import prompt_token_ids
from train_dapo import Config, make_rollout_engine, resolve, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def greedy_and_logprobs(llm, prompts):
    """Greedy token ids per prompt, and the engine's log-prob of each prompt token."""
    from vllm import SamplingParams
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, prompt_logprobs=0), use_tqdm=False)
    greedy = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[next(iter(lp.values())).logprob for lp in o.prompt_logprobs[1:]] for o in outs]
    return greedy, torch.tensor([x for row in logprobs for x in row])


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = resolve(Config(model_path=tiny_model_dir, total_steps=2, prompts_per_step=4, group_size=8, temperature=0.7,
                         gen_prompts_per_round=16, mini_batch_size=16, lr=5e-4, warmup_steps=1, val_data="",
                         save_every=100, save_every_min=1e-6, keep_checkpoints=5,  # by time: every step
                         wandb_mode="disabled", run_dir=str(run_dir)))
    return train(cfg)


def test_two_dapo_steps_log_what_the_paper_monitors(trained):
    with open(os.path.join(trained["cfg"].run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["sampling/groups_kept"] == 4 and m["actor/updates"] == 2
        for key in ["reward/mean", "reward/acc", "response/length_mean", "response/length_max",
                    "response/truncated_share", "actor/entropy", "actor/gen_prob_mean", "actor/clipfrac_low",
                    "actor/clipfrac_high", "sampling/filtered_share", "sampling/rounds", "time/rollout",
                    "time/update", "time/sync", "throughput/rollout_tokens_per_s", "throughput/update_tokens_per_s"]:
            assert key in m and m[key] == m[key], key
        # vLLM samples from the policy the trainer holds, and reports the log-probs of the distribution it
        # samples from (temperature 0.7 applied): both see the same, and the importance weights are 1
        assert m["actor/vllm_logprob_diff"] < 1e-3
        assert m["tis/weight_mean"] == pytest.approx(1.0, abs=1e-3) and m["tis/truncated_share"] == 0
    assert os.path.exists(os.path.join(trained["cfg"].run_dir, "curves.png"))
    # --save_every_min elapsed after step 1 (--save_every 100 alone would save only the last)
    assert sorted(os.listdir(os.path.join(trained["cfg"].run_dir, "checkpoints"))) == ["step-1", "step-2"]
    # one process: still FSDP2 (a group of one), as every GPU run computes
    assert type(next(trained["policy"].parameters())).__name__ == "DTensor"
    run = json.load(open(os.path.join(trained["cfg"].run_dir, "run.json")))
    assert run["config"]["total_steps"] == 2


def outcomes(per_problem: list[dict]) -> list[tuple]:
    return [(p["id"], p["acc"], p["preds"], p["lengths"], p["truncated"]) for p in per_problem]


def test_the_trainers_validation_and_eval_give_the_same_outcome_for_every_sample(trained, tmp_path):
    """Same checkpoint, problems, samples and seed: the trainer's validation (its live,
    synced engine) and eval/evaluate.py (a fresh engine from final/, in a process of its
    own) give every sample the same answer and score, whatever the model's skill: the
    gold answers are rewritten so that right and wrong both occur by construction (half
    the problems take a sampled answer as gold, the other half a gold the tiny model
    cannot write). Before any other engine is made in this process: dropping one tears
    down vLLM's groups under the live engine."""
    import dataclasses

    from train_dapo import load_prompts, validate, validation
    cfg = dataclasses.replace(trained["cfg"], val_samples=4, val_temperature=1.0, val_top_p=1.0)
    rows = data_prep.load_dapo_rows("synthetic:val")[:40]
    data_prep.write_rows(rows, str(tmp_path / "val.jsonl"))
    first = validation(cfg, trained["llm"], trained["tokenizer"],
                       load_prompts(str(tmp_path / "val.jsonl"), trained["tokenizer"], cfg.max_prompt_len))
    answered = [next((p for p in problem["preds"] if p is not None), None) for problem in first["per_problem"]]
    assert any(answered[::2]), "the model wrote no Answer: line at all: nothing to build a right answer from"
    for i, row in enumerate(rows):  # (the tiny model's vocabulary has no backslash)
        row["reward_model"]["ground_truth"] = answered[i] if i % 2 == 0 and answered[i] else "\\pi"
    data_prep.write_rows(rows, str(tmp_path / "val.jsonl"))
    val_rows = load_prompts(str(tmp_path / "val.jsonl"), trained["tokenizer"], cfg.max_prompt_len)
    live = validation(cfg, trained["llm"], trained["tokenizer"], val_rows)
    metrics = validate(cfg, trained["llm"], trained["tokenizer"], val_rows)
    proc = subprocess.run([sys.executable, "-m", "eval.evaluate", "--model", os.path.join(cfg.run_dir, "final"),
                           "--data", str(tmp_path / "val.jsonl"), "--n", "4", "--temperature", "1.0", "--top-p", "1.0",
                           "--max-tokens", str(cfg.max_response_len), "--seed", str(cfg.seed + 7), "--dtype", "float32",
                           "--out", str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = json.loads((tmp_path / "report" / "result.json").read_text())
    right = sum(map(sum, (p["acc"] for p in live["per_problem"])))
    assert 0 < right < 160  # both outcomes, by construction
    assert [p["preds"] for p in live["per_problem"]] == [p["preds"] for p in first["per_problem"]]  # golds move no sample
    assert outcomes(live["per_problem"]) == outcomes(offline["per_problem"])
    assert metrics["val/acc"] == offline["summary"]["avg@4"] == right / 160


def test_synced_engine_equals_a_fresh_engine_from_the_saved_weights(trained, tiny_model_dir):
    tokenizer = trained["tokenizer"]
    prompts = [prompt_token_ids(tokenizer, r["prompt"]) for r in data_prep.load_rows("synthetic:val")[:24]]
    live_greedy, live_lp = greedy_and_logprobs(trained["llm"], [p + [5, 6] for p in prompts])

    final_dir = os.path.join(trained["cfg"].run_dir, "final")
    fresh, _ = make_rollout_engine(final_dir, 112, "float32", seed=0)
    fresh_greedy, fresh_lp = greedy_and_logprobs(fresh, [p + [5, 6] for p in prompts])
    base, _ = make_rollout_engine(tiny_model_dir, 112, "float32", seed=0)
    base_greedy, base_lp = greedy_and_logprobs(base, [p + [5, 6] for p in prompts])

    assert live_greedy == fresh_greedy
    torch.testing.assert_close(live_lp, fresh_lp, rtol=0, atol=1e-4)
    # ...and the check can fail: training moved the weights well past that tolerance
    assert (live_lp - base_lp).abs().max() > 1e-2


def test_the_script_runs_from_the_command_line(tiny_model_dir, tmp_path):
    """The trainer as a user runs it, with the naive-GRPO preset and validation."""
    env = os.environ | {"PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "train_dapo.py", "--preset", "grpo", "--model_path", tiny_model_dir, "--total_steps", "2",
         "--prompts_per_step", "8", "--group_size", "4", "--mini_batch_size", "16", "--val_every", "1",
         "--val_max_problems", "16", "--val_samples", "2", "--wandb_mode", "disabled", "--run_dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step    2 |" in proc.stdout and "val acc" in proc.stdout
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2] and all("val/acc" in m for m in metrics)
    assert metrics[1]["sampling/rounds"] == 1 and metrics[1]["sampling/groups_generated"] == 8
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "final" / name).exists()


def test_help_lists_every_field_with_its_docstring():
    proc = subprocess.run([sys.executable, "train_dapo.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "clip-higher: upper clip 1 + eps_high" in proc.stdout and "--preset {grpo,one_gpu,paper}" in proc.stdout
    assert proc.stdout.count("\n  --") >= 40


def test_bad_flag_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "train_dapo.py", "--loss_agg_mode", "seq-sum", "--run_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--loss_agg_mode" in proc.stderr and "seq-sum" in proc.stderr

