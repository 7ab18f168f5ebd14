"""Answer matching: a table of (completion, reference, score) through the accuracy reward, the synthetic
data scoring as plain exact/choice matching, math-verify's timeout, threads and speed."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from lightning_vlm.data.synthetic import ANSWERS
from lightning_vlm.rollout.answers import canonical, extract_answer, same_answer
from lightning_vlm.rollout.rewards import accuracy

ROOT = Path(__file__).resolve().parents[2]

TABLE = [
    # the nine: equivalent answers that the regex scored 0
    ("<answer>\\boxed{4}</answer>", "4", 1.0),
    ("x = 5", "5", 1.0),
    ("30^\\circ", "30", 1.0),
    ("2\\pi", "2 \\pi", 1.0),
    ("0.5", "\\frac12", 1.0),
    ("\\sqrt{2}", "\\sqrt 2", 1.0),
    ("\\text{(B)}", "B", 1.0),
    ("12 cm", "12", 1.0),
    ("50%", "0.5", 1.0),
    # more equivalent forms
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so the total is \\boxed{1,000}", "1000", 1.0),
    ("<answer>2.50</answer>", "2.5", 1.0),
    ("\\dfrac{3}{4}", "0.75", 1.0),
    ("x^2+2x+1", "(x+1)^2", 1.0),
    ("12 \\text{ cm}", "12", 1.0),
    ("7 m^2", "7", 1.0),
    ("30°", "30", 1.0),
    ("\\{1, 2\\}", "\\{2, 1\\}", 1.0),
    ("10^{-3}", "0.001", 1.0),
    ("<answer>2</answer> ... <answer>4</answer>", "4", 1.0),  # the last answer counts
    ("<answer>(B)</answer>", "B", 1.0),
    ("The answer is C", "c", 1.0),
    ("<answer>3</answer>", "<answer> 3 </answer>", 1.0),  # the reference is extracted too
    ("3", "1 + 2 = \\boxed{3}", 1.0),
    ("\\boxed{\\frac{3}{4}}", "so the share is \\boxed{0.75}", 1.0),
    ("<answer>3</answer>", 3, 1.0),  # non-string references are compared as text
    # the synthetic data's plain answers score exactly as before
    ("red", "red", 1.0),
    ("Red", "red", 1.0),
    ("<answer>red</answer>", "red", 1.0),
    ("blue", "red", 0.0),
    ("It is red.", "red", 0.0),  # no extraction from free text: say it in <answer> or \boxed
    ("first", "first", 1.0),
    ("<answer> first </answer>", "first", 1.0),
    ("second", "first", 0.0),
    ("3", "3", 1.0),
    ("<think>count</think><answer>3</answer>", "3", 1.0),
    ("4", "3", 0.0),
    ("3 square", "3", 0.0),  # math-verify's own unit list holds "square"
    ("3 are", "3", 0.0),  # ... and "are"
    ("1 1", "2", 0.0),  # math-verify reads it as 1 + 1
    ("circle", "circle", 1.0),
    ("circles", "circle", 0.0),
    ("square", "circle", 0.0),
    # wrong answers
    ("5", "50", 0.0),
    ("0.5", "5", 0.0),
    ("B", "C", 0.0),
    ("<answer>(B)</answer>", "C", 0.0),
    ("<answer>b) cat</answer>", "B", 0.0),
    ("<answer>12</answer>", "1", 0.0),
    ("x = 6", "5", 0.0),
    ("y = 5", "x = 5", 0.0),
    ("\\sqrt{3}", "\\sqrt 2", 0.0),
    ("2\\pi", "\\pi", 0.0),
    ("12 cm", "13", 0.0),
    ("50%", "0.05", 0.0),
    ("3 less", "3", 0.0),
    ("2m", "2", 0.0),  # a one-letter unit needs a space: this may be 2*m
    ("\\boxed{\\dfrac{1}{3}}", "0.5", 0.0),
    ("\\frac{1}{3}", "0.33", 0.0),
    ("<answer>4</answer>", "1 + 2 = \\boxed{3}", 0.0),
    # rows without an answer are not scored
    ("3", None, None),
    ("red", None, None),
]


@pytest.mark.parametrize("completion, reference, score", TABLE)
def test_accuracy_table(completion, reference, score):
    assert accuracy(["p"], [completion], answer=[reference]) == [score]
    chat = [{"role": "assistant", "content": completion}]  # TRL's conversational form reads the same
    assert accuracy(["p"], [chat], answer=[reference]) == [score]


def test_the_table_is_large_and_mixed():
    scores = [s for _, _, s in TABLE]
    assert len(TABLE) >= 40 and scores.count(1.0) >= 15 and scores.count(0.0) >= 15 and None in scores


def test_synthetic_answers_score_as_exact_and_choice_matching():
    """On the synthetic data's vocabulary (its answers, alone, tagged, boxed, capitalised, and every pair of
    them, e.g. "3 square") math-verify never changes a score: accuracy is the plain canonical match."""
    words = sorted({a for answers in ANSWERS.values() for a in answers} | {"are", "is", "the", "shape"})
    forms = [f(w) for w in words for f in (str, str.capitalize, "<answer> {} </answer>".format,
                                           "\\boxed{{{}}}".format, "{}.".format)]  # fmt: skip
    completions = forms + [f"{a} {b}" for a, b in itertools.product(words, repeat=2)]
    for ref in sorted({a for answers in ANSWERS.values() for a in answers}):
        got = accuracy(["p"] * len(completions), completions, answer=[ref] * len(completions))
        want = [float(canonical(extract_answer(c)) == canonical(ref)) for c in completions]
        assert got == want, [(c, ref, g) for c, g, w in zip(completions, got, want, strict=True) if g != w]


def test_extract_and_canonical_edges():
    assert extract_answer("\\boxed{a{b}c} tail") == "a{b}c"
    assert extract_answer("\\boxed{unclosed") == "\\boxed{unclosed"
    assert extract_answer("<answer>so \\boxed{4}</answer> \\boxed{5}") == "4"  # the tag first, then its box
    assert canonical("1/0") == "1/0"  # not a number: left as text
    assert canonical("  Blue  ") == "blue" and canonical("50%") == "50" and canonical("\\text{(C)}") == "c"


def test_math_verify_times_out_in_a_plain_main_thread():
    """In a fresh process's main thread (no Trainer, no DataLoader) a pathological answer stops at the
    timeout (a tower of powers that sympy would evaluate for ever) and the next call works."""
    code = textwrap.dedent("""
        import time
        from lightning_vlm.rollout.answers import same_answer
        start = time.perf_counter()
        assert same_answer("9^{9^{9^{9}}}", "5") is False
        assert same_answer("x = 5", "5") is True
        print(round(time.perf_counter() - start, 1))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) < 30  # two 1 s timeouts at most, plus imports on a busy machine


def test_math_verify_works_off_the_main_thread():
    """signal.alarm is main-thread only: from another thread math-verify runs without its timeout
    instead of raising."""
    results: dict[str, object] = {}

    def score():
        try:
            results["got"] = [same_answer(c, r) for c, r in [("x = 5", "5"), ("2\\pi", "2 \\pi"), ("6", "5")]]
        except Exception as err:  # noqa: BLE001 - reported below
            results["got"] = err

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=120)
    assert results.get("got") == [True, True, False]
