"""Reward functions for online RL (GRPO, GSPO, PPO), referenced from YAML by import path.

A reward function is ``f(prompts, completions, **row) -> list[float | None]``: one value per completion.
Every dataset column arrives as a keyword holding one value per completion (``answer``, ``images``,
``task``, ...), so a function takes the columns it needs and ignores the rest with ``**row``. ``None``
means "not applicable to this sample" and is left out of the weighted sum. TRL's form,
``f(completions, **kwargs)`` with ``prompts`` among the keywords, works unchanged (:func:`call`).
:func:`combine` applies several functions with weights and names the function and the sample when one
raises or returns NaN.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from lightning_vlm.rollout.answers import same_answer

RewardFn = Callable[..., list[float | None]]

_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.S)


def text_of(completion: Any) -> str:
    """A completion's text, also from TRL's conversational form ``[{"role": "assistant", "content": text}]``."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def accuracy(
    prompts: Sequence, completions: Sequence[str], answer: Sequence[Any] | None = None, **row
) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference answer, else 0.0; None for rows
    without an answer. Both sides go through :func:`~lightning_vlm.rollout.answers.same_answer` (exact
    and choice matching, math-verify for mathematical answers), so the ``answer`` column may hold the bare
    answer (``"3"``), a tagged one (``"<answer> 3 </answer>"``) or a worked solution ending in
    ``\\boxed{3}``.
    """
    if answer is None:
        raise KeyError("accuracy reward: the data has no 'answer' column (map it with data.columns)")
    return [
        None if ref is None else float(same_answer(text_of(c), str(ref)))
        for c, ref in zip(completions, answer, strict=True)
    ]


def think_format(prompts: Sequence, completions: Sequence[str], **row) -> list[float | None]:
    """1.0 for ``<think>...</think><answer>...</answer>`` and nothing else around them, else 0.0."""
    return [float(bool(_FORMAT.fullmatch(text_of(c)))) for c in completions]


def _needs(owner: str, name: str, value: Any) -> Any:
    if value is None:
        raise KeyError(
            f"{owner} reward: no {name!r} keyword (the rollout passes 'completion_ids' and 'group'; "
            "dataset columns such as 'answer' come from the data, mapped with data.columns)"
        )
    return value


class OverlongPenalty:
    """DAPO's soft overlong punishment (Yu et al. 2025, https://arxiv.org/abs/2503.14476, eq. 13).

    With ``n`` the completion's token count (EOS included when generated), ``L = max_length`` and
    ``C = cache``: 0 while ``n <= L - C``, then ``(L - C - n) / C``, falling linearly to -1 at
    ``n = L``, and -1 beyond. It tells the policy that a long answer costs something before the cut
    at ``rollout.max_new_tokens`` turns it into a truncated one. DAPO pairs ``max_length`` = the
    generation limit with a cache of a fifth of it (20,480 and 4,096 tokens).
    """

    def __init__(self, max_length: int, cache: int):
        """
        Args:
            max_length: ``L_max``: completions this long or longer get -1 (usually
                ``rollout.max_new_tokens``).
            cache: ``L_cache``: the last ``cache`` tokens before ``max_length`` over which the penalty
                ramps from 0 to -1 (0: a hard -1 above ``max_length`` only).
        """
        if max_length < 1 or not 0 <= cache <= max_length:
            raise ValueError(
                f"OverlongPenalty: need max_length >= 1 and 0 <= cache <= max_length, got {max_length=}, {cache=}"
            )
        self.max_length = max_length
        self.cache = cache

    def __call__(
        self, prompts: Sequence, completions: Sequence[str], completion_ids: Sequence | None = None, **row
    ) -> list[float | None]:
        ids = _needs("OverlongPenalty", "completion_ids", completion_ids)
        return [self.penalty(len(c)) for c in ids]

    def penalty(self, n: int) -> float:
        """The penalty of a completion of ``n`` tokens."""
        start = self.max_length - self.cache
        if n <= start:
            return 0.0
        if n <= self.max_length:
            return (start - n) / self.cache
        return -1.0


class LengthPenalty:
    """Kimi k1.5's length reward (Kimi Team 2025, https://arxiv.org/abs/2501.12599, section 2.3.3).

    Within each group (the completions of one prompt), with lengths in tokens, ``lambda = 0.5 - (len -
    min_len) / (max_len - min_len)`` (0 for all when every completion has the same length). A correct
    completion gets ``lambda`` (shorter is better), an incorrect one ``min(0, lambda)`` (long wrong
    answers are punished, short ones not rewarded). It curbs overthinking: among correct answers the
    shorter ones win. Kimi adds it only after a phase of plain training (it slows early learning); reward
    functions do not see the step, so to do the same, resume a run with it added to ``rollout.rewards``.
    """

    def __init__(self, verifier: RewardFn | None = None):
        """
        Args:
            verifier: The reward function that decides correctness (a value > 0 is correct, None
                means the sample is not scored). Default: :func:`accuracy` on the ``answer`` column.
        """
        self.verifier = verifier if verifier is not None else accuracy

    def __call__(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        completion_ids: Sequence | None = None,
        group: Sequence[int] | None = None,
        **row,
    ) -> list[float | None]:
        ids = _needs("LengthPenalty", "completion_ids", completion_ids)
        groups = _needs("LengthPenalty", "group", group)
        if self.verifier is accuracy:
            _needs("LengthPenalty", "answer", row.get("answer"))
        correct = call(self.verifier, prompts, completions, {**row, "completion_ids": ids, "group": groups})
        lengths = [len(c) for c in ids]
        bounds: dict[int, tuple[int, int]] = {}
        for g, n, ok in zip(groups, lengths, correct, strict=True):
            if ok is not None:
                lo, hi = bounds.get(g, (n, n))
                bounds[g] = (min(lo, n), max(hi, n))
        out: list[float | None] = []
        for g, n, ok in zip(groups, lengths, correct, strict=True):
            if ok is None:
                out.append(None)
                continue
            lo, hi = bounds[g]
            lam = 0.0 if hi == lo else 0.5 - (n - lo) / (hi - lo)
            out.append(lam if ok > 0 else min(0.0, lam))
        return out


def combine(
    functions: Sequence[RewardFn],
    weights: Sequence[float] | None,
    prompts: Sequence,
    completions: Sequence[str],
    rows: dict[str, Sequence[Any]],
    conversational: bool = False,
) -> tuple[list[float], dict[str, list[float | None]]]:
    """Score every completion with every function and take the weighted sum of the values that apply:
    ``(total per completion, {function name: values})``; a completion for which every function returned
    None gets 0.0. A RuntimeError names the function (and the sample) when one raises, returns the wrong
    number of values, or returns NaN or inf.

    Args:
        functions: Reward functions.
        weights: One weight per function (default 1.0 each).
        prompts: One prompt per completion.
        completions: The completions' texts.
        rows: Dataset columns, one value per completion each, passed as keywords.
        conversational: Pass each completion as TRL passes it for conversational data,
            ``[{"role": "assistant", "content": text}]``, instead of its text.
    """
    weights = list(weights) if weights is not None else [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ValueError(f"{len(functions)} reward functions but {len(weights)} weights")
    n = len(completions)
    totals = [0.0] * n
    per_function: dict[str, list[float | None]] = {}
    given = [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions
    for fn, weight in zip(functions, weights, strict=True):
        name = _name(fn)
        try:
            values = call(fn, prompts, given, rows)
        except Exception as err:  # noqa: BLE001 - re-raised with the function and the sample named
            where = _failing_sample(fn, prompts, given, rows)
            at = "" if where is None else f", at sample {where} (completion {completions[where][:80]!r})"
            raise RuntimeError(
                f"reward function {name} raised on this batch of {n} completions{at}: {err!r}"
            ) from err
        if len(values) != n:
            raise RuntimeError(f"reward function {name} returned {len(values)} values for {n} completions")
        for i, value in enumerate(values):
            if value is None:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError) as err:
                raise RuntimeError(
                    f"reward function {name} returned {value!r} (a {type(value).__name__}, not a number or "
                    f"None) for sample {i} (completion {completions[i][:80]!r})"
                ) from err
            if not math.isfinite(value):
                raise RuntimeError(
                    f"reward function {name} returned {value} for sample {i} (completion {completions[i][:80]!r})"
                )
            totals[i] += weight * value
        per_function[name] = values
    return totals, per_function


def call(fn: RewardFn, prompts: Sequence, completions: Sequence, rows: dict[str, Sequence[Any]]) -> list:
    """Call a reward function in its form, told by its signature: TRL's (first parameter ``completions``,
    or keywords only) gets every argument by keyword, ours (``f(prompts, completions, **row)``) the first
    two by position. An ``async def`` function is run to its end."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): ours
        params = None
    positional = [p for p in params or () if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    trl = params is not None and (not positional or positional[0].name == "completions")
    out = fn(prompts=prompts, completions=completions, **rows) if trl else fn(prompts, completions, **rows)
    return list(asyncio.run(out) if inspect.iscoroutine(out) else out)


def _failing_sample(fn: RewardFn, prompts, completions, rows: dict) -> int | None:
    """The first sample on which ``fn`` raises when called on it alone (None if none does)."""
    for i in range(len(completions)):
        try:
            call(fn, prompts[i : i + 1], completions[i : i + 1], {k: v[i : i + 1] for k, v in rows.items()})
        except Exception:  # noqa: BLE001 - we are only locating the failure
            return i
    return None


def _name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__
