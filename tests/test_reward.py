import time

import pytest

from reward import compute_score, extract_answer

CASES = [
    # response, ground truth, expected acc
    ("48*7=336\n336+34=370\nAnswer: 370", "370", True),
    ("Answer: 025", "25", True),
    ("Answer: 25", "025", True),
    ("Answer: $\\boxed{25}$.", "25", True),
    ("Answer: \\boxed{-3}", "-3", True),
    ("Answer: 1,000", "1000", True),
    ("Answer: 0.5", "\\frac{1}{2}", True),
    ("Answer: 1/2", "0.5", True),
    ("Answer: \\dfrac{3}{4}", "0.75", True),
    ("answer: 12", "12", True),                       # DAPO's checker ignores case
    ("Answer: 7\nsome thoughts\nAnswer: 8", "8", True),  # the last Answer: line counts
    ("Answer: 7\nsome thoughts\nAnswer: 8", "7", False),
    ("Answer: \\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),  # math-verify
    ("The answer is 370", "370", False),              # no Answer: line, whatever the text says
    ("\\boxed{370}", "370", False),
    ("Answer:", "370", False),
    ("Answer: 371", "370", False),
    ("Answer: -370", "370", False),
    ("Answer: 3700", "370", False),
    ("Answer: 370x", "370", False),
]


@pytest.mark.parametrize("response,truth,acc", CASES)
def test_table(response, truth, acc):
    out = compute_score(response, truth)
    assert out["acc"] is acc
    assert out["score"] == (1.0 if acc else -1.0)


def test_pred_is_the_extracted_answer():
    assert compute_score("work\nAnswer: 42", "42")["pred"] == "42"
    assert compute_score("no line here", "42")["pred"] is None
    assert extract_answer("Answer: 1\nAnswer:  \\boxed{2} ") == "\\boxed{2}"


HOSTILE = [
    "Answer: 10^{10^{10}}",
    "Answer: 9^{9^{9^{9}}}",
    "Answer: (10^{100})!",
    "Answer: " + "9" * 100000,
    "x" * 3_000_000 + "\nAnswer: 5",
    "Answer: " * 200000,
    "Answer: \ud800\udfff\ud800",
    "Answer: " + "\\frac{" * 3000 + "1" + "}{2}" * 3000,
    "Answer: " + "(" * 5000 + "1" + ")" * 5000,
    "Answer: \\sqrt{" * 2000,
    "Answer: " + "".join(chr(c) for c in range(0x2000, 0x2400)),
    b"\xff\xfe Answer: 3".decode("latin-1"),
    None,
]


@pytest.mark.parametrize("response", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_inputs_score_in_bounded_time(response):
    t0 = time.perf_counter()
    out = compute_score(response, "5")
    assert time.perf_counter() - t0 < 10
    assert out["score"] in (1.0, -1.0) and isinstance(out["acc"], bool)
    if response and response.endswith("Answer: 5"):
        assert out["acc"]
