"""Every checkpoint is a model: eval/export.py makes an HF-format directory of a run's
checkpoints/step-N, written by one trainer or by two, which transformers and vLLM load and
which computes what the saved policy computed; eval/evaluate.py takes a checkpoint or a run
directory and records what moves its number; bad input is named in one line, nothing written."""
import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data_prep
from eval import evaluate, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vLLM against the saved policy, per token: both in fp32, differing only in their kernels'
# order of summation (vLLM's CPU attention and GEMMs, torch's sdpa): 1e-6 to 1e-5 nats here.
# One DAPO step moves these log-probs by more than 1e-1, so a wrong step or weight fails.
VLLM_BOUND = 1e-4


def tied_model(tiny_model_dir: str, out) -> str:
    """The demo model with its LM head tied to the embedding, as small Qwen2.5 models have it,
    and a generation config of its own, not the one transformers derives from the config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm.config.tie_word_embeddings = True
    lm.lm_head.weight = lm.model.embed_tokens.weight
    lm.generation_config.max_length = 77
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def one_trainer(tiny_model_dir, tmp_path_factory):
    """Two DAPO steps in this process (FSDP2, a group of one) on the tied model, a checkpoint
    after each: the run, and the policy that saved step-2."""
    from train_dapo import Config, resolve, train
    model = tied_model(tiny_model_dir, tmp_path_factory.mktemp("tied") / "model")
    # no dynamic sampling: tying the head changed the model, whose answers may all be wrong
    return train(resolve(Config(model_path=model, total_steps=2, save_every=1, prompts_per_step=4, group_size=8,
                                dynamic_sampling=False, mini_batch_size=16, val_data="", wandb_mode="disabled",
                                run_dir=str(tmp_path_factory.mktemp("one-trainer")))))


def prompts_and_responses(model_dir: str) -> tuple[list[list[int]], list[list[int]]]:
    """Eight held-out prompts, each with its worked answer as the response."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = data_prep.load_rows("synthetic:val")[:8]
    responses = [tokenizer(f"Answer: {r['answer']}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for r in rows]
    return [evaluate.prompt_token_ids(tokenizer, r["prompt"]) for r in rows], responses


def hf_logits(model_dir: str, prompts, responses) -> list[torch.Tensor]:
    """transformers' logits at every position of each prompt + response, the model as saved."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    assert lm.dtype == torch.float32  # the run's dtype: its engines ran float32
    with torch.no_grad():
        return [lm(torch.tensor([p + r])).logits[0] for p, r in zip(prompts, responses)]


def response_logprobs(logits: list[torch.Tensor], prompts, responses) -> torch.Tensor:
    """log p of each response token from the logits before it, all rows in one vector."""
    return torch.cat([torch.log_softmax(x[len(p) - 1:-1], -1)[torch.arange(len(r)), torch.tensor(r)]
                      for x, p, r in zip(logits, prompts, responses)])


def vllm_logprobs(model_dir: str, prompts, responses) -> torch.Tensor:
    """vLLM's log p of each response token, the response given as part of the prompt."""
    from vllm import SamplingParams
    llm, _ = evaluate.make_engine(model_dir, 128, "float32", seed=0)
    outs = llm.generate([{"prompt_token_ids": p + r} for p, r in zip(prompts, responses)],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return torch.tensor([o.prompt_logprobs[len(p) + i][t].logprob
                         for o, p, r in zip(outs, prompts, responses) for i, t in enumerate(r)])


def check_round_trip(run_dir, last: str, earlier: str, saved_logprobs=None) -> None:
    """`last` (the run's last checkpoint, exported) is final/, the driver's save_hf of the very
    policy that checkpoint saved: in fp32, byte for byte (weights, config, generation config,
    tokenizer), so through transformers the logits are equal bit for bit; through vLLM the
    log-probs are within VLLM_BOUND of the saved policy's (`saved_logprobs`, else final/'s
    through transformers). `earlier` (another step, exported) is not."""
    final = os.path.join(run_dir, "final")
    assert sorted(os.listdir(last)) == sorted(os.listdir(final))
    for name in os.listdir(final):
        assert filecmp.cmp(os.path.join(last, name), os.path.join(final, name), shallow=False), name
    prompts, responses = prompts_and_responses(last)
    reference = hf_logits(final, prompts, responses)
    for mine, theirs in zip(hf_logits(last, prompts, responses), reference):
        assert torch.equal(mine, theirs)
    if saved_logprobs is None:
        saved_logprobs = response_logprobs(reference, prompts, responses)
    gap = (vllm_logprobs(last, prompts, responses) - saved_logprobs).abs().max()
    assert gap < VLLM_BOUND, gap
    # ...and each comparison can fail: an earlier step's weights are well past both bounds
    other = hf_logits(earlier, prompts, responses)
    assert max((a - b).abs().max() for a, b in zip(other, reference)) > 1e-3
    assert (response_logprobs(other, prompts, responses) - saved_logprobs).abs().max() > 100 * VLLM_BOUND


def test_a_checkpoint_of_one_trainer_exports_the_policy_it_saved(one_trainer, tmp_path):
    """A tied LM head too: the checkpoint holds it beside the embedding, the export ties them."""
    from train_dapo import policy_logprobs
    run_dir = one_trainer["cfg"].run_dir
    for step in (1, 2):
        assert export.export(os.path.join(run_dir, "checkpoints", f"step-{step}"), str(tmp_path / f"step-{step}")) \
            == torch.float32
    prompts, responses = prompts_and_responses(str(tmp_path / "step-2"))
    with torch.no_grad():  # the trainer's own log-probs, from the policy that wrote step-2 (sharded, FSDP2)
        saved, _, _ = policy_logprobs(one_trainer["policy"], prompts, responses, temperature=1.0)
    saved = torch.cat([row[:len(r)] for row, r in zip(saved, responses)])
    check_round_trip(run_dir, str(tmp_path / "step-2"), str(tmp_path / "step-1"), saved)
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "step-2")
    assert lm.config.tie_word_embeddings and lm.lm_head.weight is lm.model.embed_tokens.weight


def test_a_checkpoint_of_two_trainers_exports_the_policy_they_saved(straight, tmp_path, capsys):
    """Each trainer wrote its shards of step-4; the export, one process and no process group, joins them."""
    checkpoints = straight.run_dir / "checkpoints"
    export.main([str(checkpoints / "step-4"), "--out", str(tmp_path / "step-4")])
    assert capsys.readouterr().out == (f"{checkpoints / 'step-4'} (step 4) -> {tmp_path / 'step-4'}: float32 weights, "
                                       "config and tokenizer\n")
    assert len([f for f in os.listdir(checkpoints / "step-4") if f.endswith(".distcp")]) == 2  # two trainers' shards
    export.main([str(checkpoints / "step-3"), "--out", str(tmp_path / "step-3")])
    check_round_trip(straight.run_dir, str(tmp_path / "step-4"), str(tmp_path / "step-3"))


def test_evaluate_takes_a_run_directory_and_records_what_moves_the_number(one_trainer, tmp_path):
    """A run still going (no final/): its newest checkpoint, exported beside it once and reused."""
    import transformers
    import vllm
    run = tmp_path / "run"
    shutil.copytree(os.path.join(one_trainer["cfg"].run_dir, "checkpoints"), run / "checkpoints")
    data = tmp_path / "val.jsonl"
    data_prep.write_rows(data_prep.load_dapo_rows("synthetic:val")[:6], str(data))
    proc = subprocess.run([sys.executable, "-m", "eval.evaluate", "--model", str(run), "--data", str(data),
                           "--n", "2", "--max-tokens", "16", "--seed", "3", "--temperature", "0.9", "--dtype", "float32",
                           "--out", str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"--model {run}: the run's newest weights, checkpoints/step-2 (step 2)"
    assert lines[1] == f"exported {run / 'checkpoints' / 'step-2'} to {run / 'exports' / 'step-2'} (float32)"
    assert lines[-1].startswith(f"{data} | {run} at step 2: avg@2 ")
    report = json.loads((tmp_path / "report" / "result.json").read_text())["provenance"]
    assert report == {
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "model": str(run), "model_dir": str(run / "exports" / "step-2"), "step": 2, "dtype": "float32", "seed": 3,
        "n": 2, "temperature": 0.9, "top_p": 0.7, "max_tokens": 16,
        "data": {"source": str(data), "rows": 6, "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                 "sha256_of": "the file"}}
    written = os.path.getmtime(run / "exports" / "step-2" / "model.safetensors")
    assert export.cached_export(str(run / "checkpoints" / "step-2")) == str(run / "exports" / "step-2")
    assert os.path.getmtime(run / "exports" / "step-2" / "model.safetensors") == written  # reused, not redone


def test_a_run_directory_means_its_newest_weights(tmp_path, capsys):
    """final/ when the run ended (written after its last checkpoint: that step's policy); the
    newest checkpoint when a checkpoint is newer (resumed past an earlier end); final/ of a
    step unknown once its checkpoints are gone."""
    run = tmp_path / "run"
    for i, name in enumerate(["checkpoints/step-2", "checkpoints/step-4", "final"]):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
        os.utime(run / name, (1000 + i, 1000 + i))
    assert evaluate.locate(str(run)) == (str(run / "final"), 4)
    assert capsys.readouterr().out == f"--model {run}: the run's newest weights, final (step 4)\n"
    assert evaluate.locate(str(run / "final")) == (str(run / "final"), 4)
    os.utime(run / "checkpoints" / "step-4", (2000, 2000))
    assert evaluate.locate(str(run)) == (str(run / "checkpoints" / "step-4"), 4)
    assert evaluate.locate(str(run / "final")) == (str(run / "final"), "final")
    shutil.rmtree(run / "checkpoints")
    assert evaluate.locate(str(run)) == (str(run / "final"), "final")


@pytest.fixture
def run(tmp_path):
    """A run directory with one small checkpoint, step-1."""
    from demo.base_model import build_tokenizer
    from test_checkpoint import tiny_state
    from train_dapo import save_checkpoint
    cfg, model, optimizer, scheduler, sampler, generator = tiny_state()
    cfg.run_dir = str(tmp_path / "run")
    save_checkpoint(cfg, 1, model, build_tokenizer(), optimizer, scheduler, sampler, generator)
    return tmp_path / "run"


def copy_of_step_1(run, name: str, drop: str):
    path = run / "checkpoints" / name
    shutil.copytree(run / "checkpoints" / "step-1", path)
    (shutil.rmtree if (path / drop).is_dir() else os.remove)(path / drop)
    return path


BAD = {  # how to make it; what evaluate.py, then export.py, say of it
    "cut short": (lambda run: copy_of_step_1(run, "step-2.partial", "rng-0.pt"), "an incomplete checkpoint", None),
    "a shard file missing": (lambda run: copy_of_step_1(run, "step-2", ".metadata"),
                             "an incomplete checkpoint (no .metadata)", None),
    "written before model/": (lambda run: copy_of_step_1(run, "step-2", "model"),
                              "written before checkpoints carried the model's config and tokenizer (no model/)", None),
    "no such step": (lambda run: run / "checkpoints" / "step-99",
                     f"no such checkpoint ({{run}}/checkpoints has step-1)", None),
    "foreign": (lambda run: (run / "notes").mkdir() or run / "notes",
                "not a model directory (no config.json)", "not a trainer checkpoint (no .metadata, no trainer_state.pt)"),
}


def tree(path) -> list:
    return sorted((d, sorted(fs), os.path.getmtime(d)) for d, _, fs in os.walk(path))


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_bad_input_is_named_in_one_line_and_nothing_written(run, case, command, capsys):
    make, says, export_says = BAD[case]
    path = make(run)
    message = (export_says if command == "export" and export_says else says).format(run=run)
    before = tree(run.parent)
    with pytest.raises(SystemExit) as e:
        if command == "evaluate":
            evaluate.main(["--model", str(path), "--data", "synthetic:val", "--out", str(run.parent / "report")])
        else:
            export.main([str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert f"{'--model ' if command == 'evaluate' else ''}{path}: {message}" in err
    assert tree(run.parent) == before


def test_an_export_never_writes_into_a_directory_in_use(run, capsys):
    (run / "mine").mkdir()
    (run / "mine" / "notes.txt").write_text("keep")
    before = tree(run)
    with pytest.raises(SystemExit):
        export.main([str(run / "checkpoints" / "step-1"), "--out", str(run / "mine")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run / 'mine'}: exists and is not an empty directory" in err
    assert tree(run) == before
