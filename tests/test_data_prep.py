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
