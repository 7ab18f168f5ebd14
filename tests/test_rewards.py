"""Reward functions: answer extraction and normalisation, format, weighted combination, errors."""

from __future__ import annotations

import math

import pytest

from lightning_vlm.rewards import accuracy, canonical, combine, extract_answer, think_format


@pytest.mark.parametrize(
    "completion, answer, hit",
    [
        ("red", "Red", True),
        ("It is red.", "red", False),  # no extraction from free text: say it in <answer> or \boxed
        ("<think>count them</think><answer> 3 </answer>", "3", True),
        ("<answer>2</answer> ... <answer>4</answer>", "4", True),  # the last answer counts
        ("so the total is \\boxed{1,000}", "1000", True),
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{\\dfrac{1}{3}}", "0.5", False),
        ("<answer>2.50</answer>", "2.5", True),
        ("<answer>(B)</answer>", "B", True),
        ("The answer is C", "c", True),
        ("<answer>b) cat</answer>", "B", False),
        ("<answer>12</answer>", "1", False),
    ],
)
def test_accuracy_extracts_and_normalises(completion, answer, hit):
    assert accuracy(["p"], [completion], answer=[answer]) == [float(hit)]


def test_accuracy_skips_rows_without_an_answer_and_needs_the_column():
    assert accuracy(["p", "p"], ["1", "2"], answer=[None, "2"]) == [None, 1.0]
    with pytest.raises(KeyError, match="no 'answer' column"):
        accuracy(["p"], ["1"], task=["count"])


def test_extract_and_canonical_edges():
    assert extract_answer("\\boxed{a{b}c} tail") == "a{b}c"
    assert extract_answer("\\boxed{unclosed") == "\\boxed{unclosed"
    assert canonical("1/0") == "1/0"  # not a number: left as text
    assert canonical("  Blue  ") == "blue" and canonical("50%") == "50"


def test_think_format():
    good = "<think>two shapes</think>\n<answer>2</answer>"
    assert think_format([], [good, "<answer>2</answer>", good + " extra", "<think></think><answer></answer>"]) == [
        1.0, 0.0, 0.0, 1.0,
    ]  # fmt: skip


def test_combine_weights_skips_none_and_passes_columns():
    def only_counts(prompts, completions, task, **row):
        return [1.0 if t == "count" else None for t in task]

    rows = {"answer": ["2", "red", "3"], "task": ["count", "colour", "count"]}
    completions = ["<think>x</think><answer>2</answer>", "<answer>blue</answer>", "3"]
    total, parts = combine(
        [accuracy, think_format, only_counts], [1.0, 0.5, 0.25], ["p"] * 3, completions, rows
    )
    assert total == [1.0 + 0.5 + 0.25, 0.0, 1.0 + 0.0 + 0.25]
    assert parts["only_counts"] == [1.0, None, 1.0] and parts["accuracy"] == [1.0, 0.0, 1.0]
    none_only, _ = combine([lambda p, c, **r: [None] * len(c)], None, ["p"], ["x"], {})
    assert none_only == [0.0]


def test_combine_names_the_function_and_sample_on_bad_values():
    def broken(prompts, completions, **row):
        raise ValueError("boom")

    def nan_second(prompts, completions, **row):
        return [0.0, math.nan]

    def too_few(prompts, completions, **row):
        return [0.0]

    with pytest.raises(RuntimeError, match="reward function broken raised .*boom"):
        combine([broken], None, ["p"], ["a"], {})
    with pytest.raises(
        RuntimeError, match=r"reward function nan_second returned nan for sample 1 \(completion 'b'\)"
    ):
        combine([nan_second], None, ["p", "p"], ["a", "b"], {})
    with pytest.raises(RuntimeError, match="too_few returned 1 values for 2 completions"):
        combine([too_few], None, ["p", "p"], ["a", "b"], {})
    with pytest.raises(ValueError, match="2 reward functions but 1 weights"):
        combine([accuracy, think_format], [1.0], [], [], {})
