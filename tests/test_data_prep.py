import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_prep
from data_prep import DataError, load_rows


def dapo_record(problem, answer, index):
    return {"data_source": "math_dapo", "prompt": [{"role": "user", "content": data_prep.make_prompt(problem)}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule"},
            "extra_info": {"index": index}}


def test_dapo_math_parquet_is_deduplicated(tmp_path):
    # the public copy repeats each prompt ~100 times, with distinct indices
    records = [dapo_record(f"Problem {p}", str(p * 7), f"{p}-{k}") for k in range(5) for p in range(40)]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    rows = load_rows(str(path))
    assert len(rows) == 40
    assert {r["problem"] for r in rows} == {f"Problem {p}" for p in range(40)}
    row = next(r for r in rows if r["problem"] == "Problem 3")
    assert row["answer"] == "21" and row["prompt"] == data_prep.make_prompt("Problem 3") and row["id"] == "3-0"


def test_aime_in_dapo_form_30_problems_times_32(tmp_path):
    records = [dapo_record(f"AIME problem {p}", str(p), p) for _ in range(32) for p in range(30)]
    path = tmp_path / "aime-2024.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    assert len(load_rows(str(path))) == 30


def test_aime_plain_jsonl_keeps_zero_padded_answers(tmp_path):
    path = tmp_path / "aime24.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "problem": f"Find x{i}.", "answer": f"0{i}5"}) for i in range(30)))
    rows = load_rows(str(path))
    assert len(rows) == 30 and rows[2]["answer"] == "025" and rows[2]["id"] == "2"
    assert rows[2]["prompt"].startswith("Solve the following math problem") and "Find x2." in rows[2]["prompt"]


def test_written_files_read_back_identically(tmp_path):
    rows = data_prep.synthetic_rows(50, seed=3)
    data_prep.write_rows(rows, str(tmp_path / "s.jsonl"))
    assert load_rows(str(tmp_path / "s.jsonl")) == [data_prep.flat(r) for r in rows]


def test_synthetic_splits_are_disjoint_and_correct():
    splits = data_prep.synthetic_splits(num_train=2000, num_val=200)
    train = {r["prompt"][0]["content"] for r in splits["train"]}
    assert len(train) == 2000 and not train & {r["prompt"][0]["content"] for r in splits["val"]}
    for row in splits["train"][:500]:
        expression = data_prep.problem_of(row).removeprefix("What is ").removesuffix("?")
        assert str(eval(expression)) == row["reward_model"]["ground_truth"]
    assert {r["extra_info"]["difficulty"] for r in splits["train"]} == {1, 2}


@pytest.mark.parametrize("content,message", [
    ('{"problem": "x"}', "row 0: missing field 'answer'"),
    ('{"problem": "x", "answer": 1}\n{"answer": 2}', "row 1: missing field 'problem'"),
    ('{"prompt": [{"role": "user", "content": "q"}], "reward_model": {}}', "row 0: missing field 'reward_model.ground_truth'"),
    ('{"prompt": "q", "reward_model": {"ground_truth": "1"}}', "row 0: field 'prompt' must be a chat list"),
    ('{"problem": "x", "answer": 1}\nnot json', "row 1: not valid JSON"),
    ('[1, 2]', "row 0: expected an object"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown format"):
        load_rows(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_chain_task_answers_check_and_lengths_span_the_stated_range():
    """The chain task: every worked solution scores +1 under reward.py against its gold, the
    gold is the chain's value by an independent left-to-right evaluation, every number of
    operations 1..CHAIN_MAX_OPS occurs, the worked answers run from about 10 to about 100
    tokens of the demo's tokenizer, and the splits are disjoint and the same for a seed."""
    import re

    from demo.base_model import build_tokenizer
    from reward import compute_score
    splits = data_prep.synthetic_splits(num_train=1000, num_val=100, task="chain")
    assert splits == data_prep.synthetic_splits(num_train=1000, num_val=100, task="chain")
    assert data_prep.synthetic_rows(50, seed=4, task="chain") != data_prep.synthetic_rows(50, seed=5, task="chain")
    train = {data_prep.problem_of(r) for r in splits["train"]}
    assert len(train) == 1000 and not train & {data_prep.problem_of(r) for r in splits["val"]}
    tokenizer, lengths = build_tokenizer(), []
    for row in splits["train"]:
        numbers = re.findall(r"[+-]?\d+", data_prep.problem_of(row).removeprefix("What is "))
        assert str(sum(int(n) for n in numbers)) == row["reward_model"]["ground_truth"]  # left to right: a sum
        solution = row["extra_info"]["solution"]
        assert compute_score(solution, row["reward_model"]["ground_truth"])["acc"] is True
        assert solution.count("\n") == row["extra_info"]["difficulty"] == len(numbers) - 1
        lengths.append(len(tokenizer(solution, add_special_tokens=False)["input_ids"]))
    assert {r["extra_info"]["difficulty"] for r in splits["train"]} == set(range(1, data_prep.CHAIN_MAX_OPS + 1))
    assert 8 <= min(lengths) <= 15 and 95 <= max(lengths) <= 110


def test_chain_splits_load_by_name_and_unknown_splits_are_named():
    assert len(load_rows("chain:val")) == 200 and load_rows("chain:val")[0]["answer"].lstrip("-").isdigit()
    with pytest.raises(DataError, match="chain:test: unknown split 'test'"):
        load_rows("chain:test")


def test_the_chain_base_models_mix_has_short_guesses_and_long_doubled_working():
    """demo/base_model.py's pre-training mix for the chain task, counted over 4,000 draws:
    guessed answers (no working) and doubled working at their stated shares, the doubled
    working of long chains past the ablation's L_max of 128 tokens, the rest the worked
    solution or one with a wrong step; every solution keeps the Answer line."""
    import random

    from demo import base_model
    tokenizer, rng = base_model.build_tokenizer(), random.Random(0)
    rows = data_prep.load_rows("chain:train")[:4000]
    kinds, long_doubled = {"guess": 0, "doubled": 0, "worked": 0}, 0
    for row in rows:
        text = base_model.chain_solution(row, rng, noise=0.25)
        worked = row["extra_info"]["solution"]
        assert text.splitlines()[-1].startswith("Answer: ")
        if "\n" not in text:
            kinds["guess"] += 1
            assert abs(int(text.removeprefix("Answer: ")) - int(row["answer"])) <= 9
        elif text.count("\n") == 2 * worked.count("\n"):
            kinds["doubled"] += 1
            long_doubled += len(tokenizer(text, add_special_tokens=False)["input_ids"]) > 128
        else:
            kinds["worked"] += 1
            assert text.count("\n") == worked.count("\n")
    assert abs(kinds["guess"] / 4000 - base_model.CHAIN_SHORTCUT) < 0.02
    assert abs(kinds["doubled"] / 4000 - base_model.CHAIN_VERBOSE) < 0.02
    assert 0.2 < long_doubled / kinds["doubled"] < 0.6
