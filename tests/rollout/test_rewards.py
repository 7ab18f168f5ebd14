"""Reward functions: format, weighted combination, errors, TRL's form; answer matching is in test_answers."""

from __future__ import annotations

import math

import pytest

from lightning_vlm.rollout.rewards import LengthPenalty, OverlongPenalty, accuracy, combine, think_format


def test_accuracy_skips_rows_without_an_answer_and_needs_the_column():
    assert accuracy(["p", "p"], ["1", "2"], answer=[None, "2"]) == [None, 1.0]
    with pytest.raises(KeyError, match="no 'answer' column"):
        accuracy(["p"], ["1"], task=["count"])


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


# ---------------------------------------------------------------- DAPO's soft overlong punishment
@pytest.mark.parametrize(
    "length, penalty",
    [(0, 0.0), (6, 0.0), (7, -0.25), (8, -0.5), (9, -0.75), (10, -1.0), (11, -1.0), (50, -1.0)],
)
def test_overlong_penalty_ramps_over_the_cache(length, penalty):
    # max_length 10, cache 4: free up to 10 - 4 = 6 tokens, then (6 - n) / 4, -1 from 10 on (eq. 13)
    fn = OverlongPenalty(max_length=10, cache=4)
    assert fn(["p"], ["text is ignored"], completion_ids=[list(range(length))]) == [penalty]


def test_overlong_penalty_without_a_cache_and_bad_settings():
    fn = OverlongPenalty(max_length=5, cache=0)
    assert fn(["p"] * 3, ["a"] * 3, completion_ids=[[1] * 4, [1] * 5, [1] * 6]) == [0.0, 0.0, -1.0]
    assert OverlongPenalty(max_length=4, cache=4).penalty(2) == -0.5  # the ramp may start at 0
    for bad in ({"max_length": 0, "cache": 0}, {"max_length": 8, "cache": 9}, {"max_length": 8, "cache": -1}):
        with pytest.raises(ValueError, match="OverlongPenalty: need"):
            OverlongPenalty(**bad)


# ---------------------------------------------------------------- Kimi k1.5's length reward
def test_length_penalty_by_hand():
    right, wrong = "<answer>3</answer>", "<answer>4</answer>"
    completions = [right, wrong, right, wrong, right, right, wrong, wrong, right, wrong]
    lengths = [2, 4, 6, 10, 3, 3, 1, 3, 5, 5]
    group = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    answer = ["3"] * 4 + [None] * 2 + ["3"] * 4
    got = LengthPenalty()(
        ["p"] * 10, completions, completion_ids=[[7] * n for n in lengths], group=group, answer=answer
    )
    assert got == [
        # group 0: min 2, max 10; lambda = 0.5 - (len - 2) / 8 = 0.5, 0.25, 0.0, -0.5
        0.5, 0.0, 0.0, -0.5,  # correct: lambda; incorrect: min(0, lambda)
        None, None,  # no reference answer: not scored
        0.0, -0.5,  # group 2, both wrong: lambda 0.5 and -0.5, the short wrong one gets no bonus
        0.0, 0.0,  # group 3: equal lengths, lambda 0 for all
    ]  # fmt: skip


def test_length_penalty_groups_need_not_be_contiguous_and_take_a_verifier():
    def has_x(prompts, completions, **row):
        return [1.0 if "x" in c else 0.0 for c in completions]

    fn = LengthPenalty(verifier=has_x)
    got = fn(
        ["p"] * 4, ["x", "y", "x", "y"], completion_ids=[[1], [1], [1, 1, 1], [1, 1, 1]], group=[0, 1, 0, 1]
    )
    assert got == [0.5, 0.0, -0.5, -0.5]  # lengths 1 and 3 in both groups: lambda 0.5 and -0.5


def test_missing_keywords_are_named():
    with pytest.raises(KeyError, match="OverlongPenalty reward: no 'completion_ids' keyword"):
        OverlongPenalty(max_length=8, cache=2)(["p"], ["a"], answer=["a"])
    ids, group = [[1, 2]], [0]
    with pytest.raises(KeyError, match="LengthPenalty reward: no 'completion_ids' keyword"):
        LengthPenalty()(["p"], ["a"], group=group, answer=["a"])
    with pytest.raises(KeyError, match="LengthPenalty reward: no 'group' keyword"):
        LengthPenalty()(["p"], ["a"], completion_ids=ids, answer=["a"])
    with pytest.raises(KeyError, match="LengthPenalty reward: no 'answer' keyword"):
        LengthPenalty()(["p"], ["a"], completion_ids=ids, group=group, task=["count"])
    with pytest.raises(RuntimeError, match="reward function LengthPenalty raised .*no 'answer' keyword"):
        combine([LengthPenalty()], None, ["p"], ["a"], {"completion_ids": ids, "group": group})


def test_callable_rewards_combine_with_functions():
    rows = {"answer": ["3", "3"], "completion_ids": [[1] * 2, [1] * 9], "group": [0, 0]}
    completions = ["<answer>3</answer>", "<answer>3</answer>"]
    total, parts = combine(
        [accuracy, OverlongPenalty(max_length=10, cache=4), LengthPenalty()], [1.0, 1.0, 0.5],
        ["p", "p"], completions, rows,
    )  # fmt: skip
    assert parts["OverlongPenalty"] == [0.0, -0.75] and parts["LengthPenalty"] == [0.5, -0.5]
    assert total == [1.0 + 0.0 + 0.25, 1.0 - 0.75 - 0.25]


def test_reward_config_parses_functions_and_callable_classes():
    """The YAML form of ``rollout.rewards``: import paths and ``class_path``/``init_args``."""
    from jsonargparse import ArgumentParser

    from lightning_vlm.rollout import RolloutCallback

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RolloutCallback, "rollout")
    config = """
rollout:
  rewards:
    - lightning_vlm.rollout.rewards.accuracy
    - class_path: lightning_vlm.rollout.rewards.OverlongPenalty
      init_args: {max_length: 64, cache: 16}
    - class_path: lightning_vlm.rollout.rewards.LengthPenalty
    - class_path: lightning_vlm.objectives.RewardModelReward
      init_args: {path: runs/rm/hf, batch_size: 4}
"""
    rewards = parser.instantiate(parser.parse_string(config)).rollout.rewards
    assert rewards[0] is accuracy
    assert isinstance(rewards[1], OverlongPenalty) and (rewards[1].max_length, rewards[1].cache) == (64, 16)
    assert isinstance(rewards[2], LengthPenalty) and rewards[2].verifier is accuracy
    assert (
        type(rewards[3]).__name__ == "RewardModelReward" and rewards[3].model is None
    )  # loads on first call
    with pytest.raises(Exception, match="max_lenght"):  # a typo in init_args fails at parse time, named
        parser.parse_string(config.replace("max_length", "max_lenght"))


# ---------------------------------------------------------------- TRL's reward functions, unchanged
def test_trl_reward_functions_run_unchanged_in_both_formats():
    from tests.helpers import trl_rewards as trl

    prompts = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    ] * 3
    texts = ["<think>look</think><answer>red</answer>", "colour", "\\boxed{red}"]
    rows = {"ground_truth": ["red"] * 3, "solution": ["red", "red", "blue"], "task": ["colour"] * 3}
    total, parts = combine([trl.reward_len, trl.reward_func, trl.async_reward, accuracy], None, prompts, texts,
                           {**rows, "answer": ["red"] * 3})  # fmt: skip
    assert parts["reward_len"] == [-abs(20 - len(t)) for t in texts] == [-19, -14, -9]
    assert parts["reward_func"] == [0.0, 0.0, 1.0] and parts["async_reward"] == [1.0, 1.0, 1.0]
    assert parts["accuracy"] == [1.0, 0.0, 1.0]
    # conversational: completions as TRL passes them for chat prompts; the built-in rewards read both forms
    _, parts = combine([trl.format_reward_func, trl.solution_reward, accuracy, think_format], None, prompts,
                       ["<think>look</think><answer>red</answer>", "colour", "red"],
                       {**rows, "answer": ["red"] * 3}, conversational=True)  # fmt: skip
    assert parts["format_reward_func"] == [1.0, 0.0, 0.0] and parts["think_format"] == [1.0, 0.0, 0.0]
    assert parts["solution_reward"] == [0.0, -1.0, 0.0] and parts["accuracy"] == [1.0, 0.0, 1.0]
    with pytest.raises(RuntimeError, match=r"format_reward_func raised .*at sample 0 .*string indices"):
        combine([trl.format_reward_func], None, prompts, texts, rows)  # a conversational function on text


def test_the_calling_form_is_read_from_the_signature():
    seen = {}

    def trl_form(completions, **kwargs):  # prompts only as a keyword
        seen["trl"] = kwargs["prompts"]
        return [0.0] * len(completions)

    def keywords_only(**kwargs):
        seen["keywords"] = (kwargs["prompts"], kwargs["completions"])
        return [0.0]

    def ours(p, c, **row):  # any names, by position
        seen["ours"] = (p, c)
        return [0.0]

    combine([trl_form, keywords_only, ours, lambda x, y, **r: [float(x == ["q"] and y == ["a"])]], None, ["q"],
            ["a"], {"completion_ids": [[1]], "group": [0]})  # fmt: skip
    assert seen == {"trl": ["q"], "keywords": (["q"], ["a"]), "ours": (["q"], ["a"])}
    # LengthPenalty's verifier may be in TRL's form too
    from tests.helpers.trl_rewards import reward_func

    got = LengthPenalty(verifier=reward_func)(["q"] * 2, ["\\boxed{3}", "no"], completion_ids=[[1], [1, 1]],
                                              group=[0, 0], ground_truth=["3", "3"])  # fmt: skip
    assert got == [0.5, -0.5]
