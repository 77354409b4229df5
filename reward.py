"""DAPO's rule-based reward: +1 if the last `Answer:` line is equivalent to the
ground truth, else -1; and the soft overlong punishment (DAPO.md, section 4).

Rewards are pure and never raise: text in, a score and its parts out. Whatever a
policy writes (megabyte strings, towers of exponents, unbalanced LaTeX, lone
surrogates) costs a bounded time and ends as a score, never as an exception.
"""
import importlib.util
import re
from fractions import Fraction

import torch

if importlib.util.find_spec("math_verify") is None:  # imported where used (it pulls sympy), but needed
    raise ImportError("reward.py needs math-verify (pip install math-verify==0.9.0): without it every answer "
                      "that is not a plain number would score -1")

MAX_ANSWER_CHARS = 5000    # the tail of the answer line that is read: math-verify takes the last
                           # answer in it, and a bounded input keeps its regexes and parsers bounded
VERIFY_TIMEOUT_S = 2       # math-verify's budget per stage (signal-based, main thread)
VERIFY_STAGES = 5          # a call of compute_score takes at most this many: parse the gold and the
                           # answer, each in up to two readings (readings()), then verify

# Case-insensitive like DAPO's public checker; `[^\n]*` is linear, so no regex blow-up.
_ANSWER_LINE = re.compile(r"(?i)answer\s*:[ \t]*([^\n]*)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{(.*)\}")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_NUMBER = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)(/\d+)?$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d*)?$")  # 1,000 and 12,345.5; not 1,2 (a pair)
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")  # math already marked as math ($, \(, \[, \boxed)
_COMMA_NUMBER = re.compile(r"^-?\d+(,\d+)+(\.\d+)?$")      # 1,22: a decimal comma, or the pair 1, 22
_TOWER = re.compile(r"\^\s*(\{[^{}]*|[\w.]+\s*)\^")      # an exponent with an exponent: 9^{9^{9}}, not (3^5)^6


def extract_answer(response: str) -> str | None:
    """The text after the last `Answer:` in the response, or None if there is none; of a
    line longer than MAX_ANSWER_CHARS only the tail (math-verify reads the last answer in it)."""
    matches = _ANSWER_LINE.findall(response)
    answer = matches[-1].strip()[-MAX_ANSWER_CHARS:] if matches else ""
    return answer or None


def normalize(answer: str) -> str:
    """Strip the wrapping models put around a final answer: $..$, \\boxed{}, \\text{}, a
    period. Commas and spaces stay: in (8,-2), \\{1,2\\} or [-2, 7] they are the answer."""
    s = answer.strip()
    for _ in range(3):  # wrappers nest, e.g. $\boxed{25}$.
        s = s.strip().strip("$").strip()
        s = s.removeprefix("\\(").removesuffix("\\)").removeprefix("\\[").removesuffix("\\]")
        boxed = _BOXED.search(s)
        if boxed:
            s = boxed.group(1)
        s = _TEXT.sub(r"\1", s).rstrip(".").strip()
    return s


def as_number(s: str) -> Fraction | None:
    """An exact rational for integers (thousands separated or not), decimals, a/b and
    \\frac{a}{b}; None for anything else."""
    s = s.replace("\\!", "").replace("{,}", ",")
    if _THOUSANDS.match(s):  # before spaces go: "32, 349" is a pair
        s = s.replace(",", "")
    s = s.replace(" ", "")
    frac = _FRAC.match(s)
    if frac:
        sign, num, den = frac.groups()
        s = f"{sign}{num}/{den}"
    if len(s) > 100 or not _NUMBER.match(s):  # length cap: int("9"*5000) raises in Python 3.11
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def readings(text: str) -> list[str]:
    """What math-verify is handed for one side: text that marks its own math ($...$,
    \\boxed{}), prose around it included, as written (math-verify extracts the last answer);
    bare LaTeX wrapped as $text$; a number with a comma both ways (1,22: 1.22 or a pair)."""
    if _DELIMITED.search(text):
        return [text]
    return [text, f"${text}$"] if _COMMA_NUMBER.match(text.replace(" ", "")) else [f"${text}$"]


def math_verify_equal(pred: str, truth: str) -> bool:
    """Symbolic equivalence by math-verify (any reading of the answer against any of the
    gold), for what the exact paths cannot decide."""
    from math_verify import parse, verify  # imported lazily: it pulls sympy

    try:
        gold = [x for t in readings(truth) for x in parse(t, parsing_timeout=VERIFY_TIMEOUT_S)]
        guess = [x for t in readings(pred) for x in parse(t, parsing_timeout=VERIFY_TIMEOUT_S)]
        return bool(gold and guess and verify(gold, guess, timeout_seconds=VERIFY_TIMEOUT_S))
    except Exception:  # sympy can raise anything, RecursionError and timeouts included.
        return False


def is_equivalent(pred: str, truth: str) -> bool:
    """Exact where that settles it (the same text, equal rationals, two different integers:
    AIME's whole set, without sympy); math-verify on the answers as written otherwise, so
    that tuples, sets and intervals keep their structure, prose around a $...$ answer is
    read as math-verify reads it, and a long decimal may match."""
    a, b = normalize(pred), normalize(truth)
    if a == b:
        return True
    x, y = as_number(a), as_number(b)
    if x is not None and y is not None and (x == y or x.denominator == y.denominator == 1):
        return x == y
    if not a or _TOWER.search(pred):
        return False  # towers of exponents are where sympy hangs (in C, past any timeout)
    return math_verify_equal(pred.strip(), truth.strip())


def compute_score(response: str, ground_truth: str) -> dict:
    """{"score": +1.0 or -1.0, "acc": bool, "pred": extracted answer or None}. Never raises."""
    try:
        if not isinstance(response, str):
            response = str(response)
        # Lone surrogates (invalid UTF-8 from a byte-level decoder) would break C-level parsers.
        response = response.encode("utf-8", "replace").decode("utf-8")
        pred = extract_answer(response)
        acc = pred is not None and is_equivalent(pred, str(ground_truth))
    except Exception:
        pred, acc = None, False
    return {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


def overlong_penalty(lengths, max_len: int, cache_len: int) -> torch.Tensor:
    """Soft overlong punishment: 0 up to max_len - cache_len, then a linear ramp to -1 at
    max_len, and -1 beyond. `lengths` are response lengths in tokens (any sequence)."""
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    expected = max_len - cache_len
    ramp = (expected - lengths) / cache_len
    return torch.where(lengths <= expected, 0.0, torch.where(lengths <= max_len, ramp, -1.0))
