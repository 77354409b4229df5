import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

import reward

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
    """Within the documented budget (math-verify's VERIFY_STAGES, VERIFY_TIMEOUT_S each, plus
    a second of margin), and scored right: only the one that answers 5 is correct."""
    t0 = time.perf_counter()
    out = compute_score(response, "5")
    assert time.perf_counter() - t0 < reward.VERIFY_STAGES * reward.VERIFY_TIMEOUT_S + 1
    correct = isinstance(response, str) and response.endswith("\nAnswer: 5")
    assert out["score"] == (1.0 if correct else -1.0) and out["acc"] is correct
    assert not correct or (out["pred"] == "5" and out["timeout"] is False)


# Single-line answers beyond integers, in the style of math-verify's own test cases: tuples,
# intervals, sets, fractions, decimals, percentages, units, \\text{}, expressions. Commas and
# spaces are part of such answers: (8,-2) is not 8-2, and 1,2 is not 12.
BEYOND_INTEGERS = [  # (answer as the model wrote it, gold, equivalent?)
    ("\\{1,2\\}", "\\{2,1\\}", True), ("x \\in [-2,7]", "-2 \\le x \\le 7", True), ("6", "(8,-2)", False),
    ("12", "1,2", False), ("(8,-2)", "(8, -2)", True), ("(8,-2)", "(-2,8)", False), ("[1,3)", "[1, 3)", True),
    ("[1,3)", "[1,3]", False), ("(-\\infty, 2]", "(-\\infty,2]", True), ("\\frac{1}{2}", "0.5", True),
    ("50\\%", "50", True), ("50\\%", "0.5", True), ("0.333", "\\frac{1}{3}", False), ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("2\\sqrt{2}", "\\sqrt{2}", False), ("\\text{Monday}", "Monday", True), ("\\text{(B)}", "B", True),
    ("x=3", "3", True), ("y = 2x + 1", "2x+1", True), ("x^2+2x+1", "(x+1)^2", True), ("1,000", "1000", True),
    ("1{,}000", "1000", True), ("3.14", "\\pi", False), ("\\pi", "\\pi", True), ("2\\pi", "6.28", False),
    ("45^\\circ", "45", True), ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", True),
    ("-\\frac{3}{4}", "-0.75", True), ("\\dfrac{7}{8}", "\\frac78", True), ("1, 2, 3", "1,2,3", True),
    ("(1,2)", "(2,1)", False), ("\\{1,2,3\\}", "\\{3,2,1\\}", True), ("a+b", "b+a", True), ("2^{10}", "1024", True), ("10^{3}", "1000", True),
    ("0.1", "1/10", True), (".5", "1/2", True), ("5.0", "5", True), ("5.00", "5", True), ("5.01", "5", False),
    ("\\$18.90", "18.90", True), ("18.9", "18.90", True), ("\\frac{1}{6}", "\\frac{2}{12}", True),
    ("-2", "2", False), ("\\infty", "\\infty", True), ("\\emptyset", "\\emptyset", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("3 + 4i", "4i + 3", True), ("3-4i", "3+4i", False), ("\\log_2 8", "3", True), ("e^{0}", "1", True),
    ("\\frac{3}{2}", "1\\frac{1}{2}", True), ("x=1, x=2", "1,2", True), ("7", "007", True), 
    ("\\text{no solution}", "\\text{No solution}", True), ("(0,1)", "(0, 1)", True), ("2, 3", "3, 2", True),
]


@pytest.mark.parametrize("answer,gold,equivalent", BEYOND_INTEGERS)
def test_answers_beyond_integers(answer, gold, equivalent):
    assert compute_score(f"Answer: {answer}", gold)["acc"] is equivalent


# Free-form answer lines, labelled, with golds as math-verify's own tests write them: prose around
# $...$ (math-verify reads the last answer in the line), lines past MAX_ANSWER_CHARS (the tail is
# read), comparison operators both ways, matrices, decimal commas, percentages and units.
FILL = "we expand, collect the terms and simplify the result step by step, " * 5
LONG_MATH = "Since $" + "1+" * 3000 + "1 = 3001$, the answer is $\\frac{1}{2}$."
ANSWER_LINES = [  # (the line after Answer:, gold, equivalent?)
    ("Therefore $x \\geq 5$ is the solution.", "$x \\ge 5$", True),
    ("So the answer is $\\frac{3}{4}$.", "$0.75$", True),
    ("We get $x = 2$ or $x = 3$, and only $x = 3$ works.", "$3$", True),
    ("The solution is $x \\leq 5$.", "$x \\geq 5$", False),
    ("The identity matrix is $\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}$.", "$\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}$", True),
    ("The product is $\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}$.", "$\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}$", True),
    ("The product is $\\begin{bmatrix}1&2\\\\3&5\\end{bmatrix}$.", "$\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}$", False),
    ("$\\left(\\begin{array}{cc}1&2\\\\3&4\\end{array}\\right)$", "$\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}$", True),
    ("We have that " + FILL + "so the answer is $3\\sqrt{13}$.", "$3\\sqrt{13}$", True),
    ("We have that " + FILL + "so the answer is $3\\sqrt{12}$.", "$3\\sqrt{13}$", False),
    ("x" * 6000 + " so $\\boxed{42}$", "$42$", True),
    ("We find $\\boxed{20}$ percent. Note: " + FILL, "$20$", True),   # the boxed answer, then prose
    (LONG_MATH, "$0.5$", True),
    ("$x >= 5$", "$x \\geq 5$", True),
    ("$x \\neq 2$", "$x != 2$", True),
    ("$x \\ge 5$", "$x > 5$", False),
    ("$x < 3$", "$x \\leq 3$", False),
    ("1,22", "1.22", True),
    ("1000,99", "1000.99", True),
    ("1,5", "15", False),
    ("The rate is $25\\%$.", "$0.25$", True),
    ("It costs $18.90 in total.", "18.90", True),
    ("The side is $12$ cm long.", "$12$", True),
    ("The side is $12$ cm long.", "$13$", False),
    ("$5 \\text{ meters}$", "$5$", True),
    ("so the angle is $45^\\circ$", "$45$", True),
    ("the roots are $x=1$ and $x=2$, so $\\{1, 2\\}$", "$\\{2,1\\}$", True),
]


@pytest.mark.parametrize("line,gold,equivalent", ANSWER_LINES, ids=range(len(ANSWER_LINES)))
def test_answer_lines_score_as_math_verify_reads_them(line, gold, equivalent):
    """The label, and what math-verify alone says when handed the line as written: the
    reward agrees with math-verify on every line of this set, and neither with a wrong label."""
    from math_verify import parse, verify
    assert bool(verify(parse(gold), parse(line))) is equivalent
    assert compute_score(f"worked steps\nAnswer: {line}", gold)["acc"] is equivalent


def test_without_math_verify_the_reward_refuses_to_load():
    import subprocess
    import sys
    code = ("import importlib.util; find = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda name, *a: None if name == 'math_verify' else find(name, *a); "
            "import reward")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode != 0 and "reward.py needs math-verify" in proc.stderr


LABELLED = ([(response, gold, acc) for response, gold, acc in CASES]
            + [(f"Answer: {answer}", gold, eq) for answer, gold, eq in BEYOND_INTEGERS]
            + [(f"worked steps\nAnswer: {line}", gold, eq) for line, gold, eq in ANSWER_LINES])
OUT_OF_TIME = "Answer: (10^{100})!"  # a hostile input that no machine checks within a stage
HOSTILE_LABELLED = [(response, "5", isinstance(response, str) and response.endswith("\nAnswer: 5"))
                    for response in HOSTILE]


def timed_scores(pairs):
    """compute_score of each (response, gold), with the seconds it took."""
    scored = []
    for response, gold in pairs:
        t0 = time.perf_counter()
        scored.append((compute_score(response, gold), time.perf_counter() - t0))
    return scored


def misscored(cases, scored):
    """The cases scored against their label, past the bound, or with a wrong "timeout" (no
    labelled answer runs out of time, OUT_OF_TIME always does; the rest of HOSTILE may)."""
    bound = reward.VERIFY_STAGES * reward.VERIFY_TIMEOUT_S + 1
    return [(str(response)[:60], gold, out, round(seconds, 2))
            for i, ((response, gold, acc), (out, seconds)) in enumerate(zip(cases, scored))
            if (out["acc"], out["score"]) != (acc, 1.0 if acc else -1.0) or seconds >= bound
            or ((i < len(LABELLED) or response == OUT_OF_TIME) and out["timeout"] is not (response == OUT_OF_TIME))]


def test_scores_are_equal_in_the_main_thread_another_thread_and_a_worker_process():
    """Every labelled answer and every hostile input, scored in the three places at once: the
    label in each, each call within the bound, and a check cut short counted in each."""
    assert OUT_OF_TIME in HOSTILE
    cases = LABELLED + HOSTILE_LABELLED
    pairs = [(response, gold) for response, gold, _ in cases]
    with ThreadPoolExecutor(1) as thread, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as process:
        elsewhere = {"thread": thread.submit(timed_scores, pairs), "process": process.submit(timed_scores, pairs)}
        places = {"main": timed_scores(pairs)} | {place: future.result() for place, future in elsewhere.items()}
    assert {place: misscored(cases, scored) for place, scored in places.items()} == {place: [] for place in places}
    preds = {place: [out["pred"] for out, _ in scored] for place, scored in places.items()}
    assert preds["main"] == preds["thread"] == preds["process"]


def test_a_checker_past_the_budget_is_killed_and_replaced(monkeypatch):
    """Off the main thread the bound is the checker's kill: past CHECK_BUDGET_S (shortened here,
    below the 2 s a stage's own alarm takes) the check ends as a timeout, and the next check gets
    a new checker. The first check starts one, so that the timed one is timed from a ready one."""
    monkeypatch.setattr(reward, "CHECK_BUDGET_S", 0.5)
    pairs = [("Answer: (8,-2)", "(8, -2)"), (OUT_OF_TIME, "5"), ("Answer: x^2+2x+1", "(x+1)^2")]
    scored = []
    thread = threading.Thread(target=lambda: scored.extend(timed_scores(pairs)))
    thread.start()
    thread.join()
    (ready, _), (out, seconds), (after, _) = scored
    assert out["timeout"] is True and out["score"] == -1.0 and seconds < reward.CHECK_BUDGET_S + 1
    assert [ready["score"], ready["timeout"], after["score"], after["timeout"]] == [1.0, False, 1.0, False]
