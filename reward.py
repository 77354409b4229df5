"""DAPO's rule-based reward: +1 if the last `Answer:` line is equivalent to the
ground truth, else -1; and the soft overlong punishment (DAPO.md, section 4).

Rewards are pure and never raise: text in, a score and its parts out. Whatever a
policy writes (megabyte strings, towers of exponents, unbalanced LaTeX, lone
surrogates) costs a bounded time and ends as a score, never as an exception, and the
same score in a main thread, in any other thread and in any process. The bound is
math-verify's: VERIFY_TIMEOUT_S a stage and CHECK_BUDGET_S a check, kept by SIGALRM in a
main thread; off it (signals reach only main threads) the check runs in a checker
process, killed past CHECK_BUDGET_S. A check cut short is counted ("timeout"), not silent.
"""
import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from itertools import product
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait

if importlib.util.find_spec("math_verify") is None:  # imported where used (it pulls sympy), but needed
    raise ImportError("reward.py needs math-verify (pip install math-verify==0.9.0): without it every answer "
                      "that is not a plain number would score -1")

MAX_ANSWER_CHARS = 5000    # the tail of the answer line that is read: math-verify takes the last
                           # answer in it, and a bounded input keeps its regexes and parsers bounded
VERIFY_TIMEOUT_S = 2       # math-verify's budget a stage: parsing one reading, or verifying one pair
VERIFY_STAGES = 5          # and a check's, in stages: parse the gold and the answer, each in up to
                           # two readings (readings()), then verify
CHECK_BUDGET_S = VERIFY_STAGES * VERIFY_TIMEOUT_S  # kept as a whole too: more pairs get no more time

# math-verify warns once a process that its own timeouts are off: they are, as _Budget's run instead.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda record: not record.getMessage().startswith("Timeout is disabled"))

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


def math_verify_equal(pred: str, truth: str) -> bool | None:
    """Symbolic equivalence by math-verify (any reading of the answer against any of the
    gold), for what the exact paths cannot decide; None if it could not decide (out of
    time, or an error)."""
    if threading.current_thread() is threading.main_thread():
        return _check(pred, truth)
    return _check_in_checker(pred, truth)


class _OutOfTime(BaseException):
    """A stage's alarm: a BaseException, as math-verify's own timeout is, so that no
    `except Exception` in math-verify or sympy swallows it."""


def _ring(signum, frame):
    raise _OutOfTime


class _Budget:
    """A check's time, kept by SIGALRM (so in a main thread): VERIFY_TIMEOUT_S a stage,
    CHECK_BUDGET_S in all; a stage out of time gives its fallback and is remembered."""

    def __init__(self):
        self.deadline = time.monotonic() + CHECK_BUDGET_S
        self.ran_out = False

    def stage(self, fallback, fn, *args, **kwargs):
        seconds = min(VERIFY_TIMEOUT_S, self.deadline - time.monotonic())
        if seconds <= 0:
            self.ran_out = True
            return fallback
        old = signal.signal(signal.SIGALRM, _ring)
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            return fn(*args, **kwargs)
        except _OutOfTime:
            self.ran_out = True
            return fallback
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def _check(pred: str, truth: str) -> bool | None:
    """math_verify_equal in this thread, a main one. math-verify's own timeouts are off: they
    end a stage as _Budget's do (as no answer, or no match), but silently."""
    from math_verify import parse, verify  # imported lazily: it pulls sympy

    budget = _Budget()
    try:
        gold = [x for t in readings(truth) for x in budget.stage([], parse, t, parsing_timeout=None)]
        guess = [x for t in readings(pred) for x in budget.stage([], parse, t, parsing_timeout=None)]
        if any(budget.stage(False, verify, g, x, timeout_seconds=None) for g, x in product(gold, guess)):
            return True
    except (_OutOfTime, Exception):  # an alarm that rang as its stage ended; sympy can raise anything
        return None
    return None if budget.ran_out else False


_idle: list["_Checker"] = []  # checker processes between checks: as many as threads have checked at once
_idle_lock = threading.Lock()


def _forget_checkers():
    """In a forked child: its parent's checkers are the parent's (their connections are shared)."""
    global _idle, _idle_lock
    _idle, _idle_lock = [], threading.Lock()


os.register_at_fork(after_in_child=_forget_checkers)


def _check_in_checker(pred: str, truth: str) -> bool | None:
    """_check in a checker process, for a caller off the main thread; one that overruns
    CHECK_BUDGET_S (sympy can hang in C, where no alarm reaches) or fails is killed."""
    with _idle_lock:
        checker = _idle.pop() if _idle else None
    try:
        checker = checker or _Checker()
        equal = checker.check(pred, truth)
    except Exception:  # out of time, a checker that died, or none could start
        if checker is not None:
            checker.close()
        return None
    with _idle_lock:
        _idle.append(checker)
    return equal


class _Checker:
    """A Python process that runs _check in its main thread. A fresh interpreter, not a
    multiprocessing child: those re-run the caller's __main__, a script for all we know.
    Ready once math-verify is imported, so that a check's budget is spent checking."""

    def __init__(self):
        self.conn, theirs = Pipe()
        here, fd = os.path.dirname(os.path.abspath(__file__)), theirs.fileno()
        code = f"import sys; sys.path.insert(0, {here!r}); import reward; reward._serve({fd}, {os.getpid()})"
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=[fd], stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn.recv()

    def check(self, pred: str, truth: str) -> bool | None:
        self.conn.send((pred, truth))
        if not self.conn.poll(CHECK_BUDGET_S):
            raise TimeoutError
        return self.conn.recv()

    def close(self):
        self.process.kill()
        self.process.wait()
        self.conn.close()


def _serve(fd: int, parent: int) -> None:
    """A checker's loop: checks until its parent ends (the pidfd turns readable) or closes
    the connection (a process it forked may hold a copy, so both count)."""
    import math_verify  # noqa: F401 -- before "ready": the import is no check's time

    conn, alive = Connection(fd), os.pidfd_open(parent)
    conn.send("ready")
    try:
        while wait([conn, alive]) == [conn]:
            conn.send(_check(*conn.recv()))
    except (EOFError, OSError):  # the parent has gone
        pass


def is_equivalent(pred: str, truth: str) -> bool | None:
    """Exact where that settles it (the same text, equal rationals, two different integers:
    AIME's whole set, without sympy); math-verify on the answers as written otherwise, so
    that tuples, sets and intervals keep their structure, prose around a $...$ answer is
    read as math-verify reads it, and a long decimal may match. None: math-verify could
    not decide."""
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
    """{"score": +1.0 or -1.0, "acc": bool, "pred": extracted answer or None, "timeout": bool}.
    "timeout": the check ran out of time or failed, so its -1 is no verdict. Never raises."""
    try:
        if not isinstance(response, str):
            response = str(response)
        # Lone surrogates (invalid UTF-8 from a byte-level decoder) would break C-level parsers.
        response = response.encode("utf-8", "replace").decode("utf-8")
        pred = extract_answer(response)
        equal = pred is not None and is_equivalent(pred, str(ground_truth))
    except Exception:
        pred, equal = None, None
    return {"score": 1.0 if equal else -1.0, "acc": equal is True, "pred": pred, "timeout": equal is None}


def overlong_penalty(lengths, max_len: int, cache_len: int) -> "torch.Tensor":
    """Soft overlong punishment: 0 up to max_len - cache_len, then a linear ramp to -1 at
    max_len, and -1 beyond. `lengths` are response lengths in tokens (any sequence)."""
    import torch  # imported where used: a checker process needs none of it, and it takes seconds

    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    expected = max_len - cache_len
    ramp = (expected - lengths) / cache_len
    return torch.where(lengths <= expected, 0.0, torch.where(lengths <= max_len, ramp, -1.0))
