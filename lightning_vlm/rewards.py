"""Reward functions for online RL (GRPO, GSPO, PPO), referenced from YAML by import path.

A reward function is ``f(prompts, completions, **row) -> list[float | None]``: one value per
completion. Every dataset column arrives as a keyword holding one value per completion (``answer``,
``images``, ``task``, ...), so a function takes the columns it needs and ignores the rest with
``**row``. ``None`` means "not applicable to this sample" and is left out of the weighted sum.
:func:`combine` applies several functions with weights and names the function and the sample when
one raises or returns NaN.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from lightning_vlm.metrics import normalize_answer

RewardFn = Callable[..., list[float | None]]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_CHOICE = re.compile(r"^(?:the\s+)?(?:answer|option|choice)?\s*(?:is)?\s*:?\s*\(?([a-z])\)?[.):]?$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?$")
_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.S)


def extract_answer(text: str) -> str:
    """The final answer in a completion: the last ``<answer>...</answer>``, else the last
    ``\\boxed{...}`` (nested braces allowed), else the whole text."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j]
    return text


def canonical(text: str) -> str:
    """Normalise an answer for comparison: case, spaces and outer punctuation; numbers to one form
    (``"1,000"``, ``"1000.0"`` -> ``"1000"``; ``"1/2"`` and ``"\\frac{1}{2}"`` -> ``"0.5"``; a
    trailing ``%`` is dropped); choice letters to the letter
    (``"(B)"``, ``"B."``, ``"Answer: b"`` -> ``"b"``)."""
    norm = normalize_answer(_FRAC.sub(r"\1/\2", text).replace("\\!", ""))
    compact = norm.replace(",", "").replace(" ", "").rstrip("%")
    if "/" in compact and compact.count("/") == 1:
        num, den = compact.split("/")
        if _NUMBER.match(num) and _NUMBER.match(den) and float(den) != 0:
            return _number(float(num) / float(den))
    if _NUMBER.match(compact):
        return _number(float(compact))
    choice = _CHOICE.match(norm)
    if choice:
        return choice.group(1)
    return norm


def _number(value: float) -> str:
    return f"{value:.10g}"


def accuracy(
    prompts: Sequence, completions: Sequence[str], answer: Sequence[Any] | None = None, **row
) -> list[float | None]:
    """1.0 when the completion's final answer (see :func:`extract_answer`) equals ``answer`` after
    :func:`canonical` normalisation, else 0.0; None for rows without an answer."""
    if answer is None:
        raise KeyError("accuracy reward: the data has no 'answer' column (map it with data.columns)")
    return [
        None if ref is None else float(canonical(extract_answer(c)) == canonical(str(ref)))
        for c, ref in zip(completions, answer, strict=True)
    ]


def think_format(prompts: Sequence, completions: Sequence[str], **row) -> list[float | None]:
    """1.0 for ``<think>...</think><answer>...</answer>`` and nothing else around them, else 0.0."""
    return [float(bool(_FORMAT.fullmatch(c))) for c in completions]


def combine(
    functions: Sequence[RewardFn],
    weights: Sequence[float] | None,
    prompts: Sequence,
    completions: Sequence[str],
    rows: dict[str, Sequence[Any]],
) -> tuple[list[float], dict[str, list[float | None]]]:
    """Score every completion with every function and take the weighted sum of the values that apply.

    Args:
        functions: Reward functions.
        weights: One weight per function (default 1.0 each).
        prompts: One prompt per completion.
        completions: The completions' texts.
        rows: Dataset columns, one value per completion each, passed as keywords.

    Returns:
        ``(total per completion, {function name: values})``. A completion for which every function
        returned None gets 0.0.

    Raises:
        RuntimeError: naming the function (and the sample) when one raises, returns the wrong number
            of values, or returns NaN or inf.
    """
    weights = list(weights) if weights is not None else [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ValueError(f"{len(functions)} reward functions but {len(weights)} weights")
    n = len(completions)
    totals = [0.0] * n
    per_function: dict[str, list[float | None]] = {}
    for fn, weight in zip(functions, weights, strict=True):
        name = _name(fn)
        try:
            values = list(fn(prompts, completions, **rows))
        except Exception as err:  # noqa: BLE001 - re-raised with the function named
            raise RuntimeError(
                f"reward function {name} raised on this batch of {n} completions: {err!r}"
            ) from err
        if len(values) != n:
            raise RuntimeError(f"reward function {name} returned {len(values)} values for {n} completions")
        for i, value in enumerate(values):
            if value is None:
                continue
            if not math.isfinite(float(value)):
                raise RuntimeError(
                    f"reward function {name} returned {value} for sample {i} (completion {completions[i][:80]!r})"
                )
            totals[i] += weight * float(value)
        per_function[name] = values
    return totals, per_function


def _name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__
