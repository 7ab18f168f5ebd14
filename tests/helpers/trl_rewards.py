# ruff: noqa: B905 - written as TRL documents reward functions, zip() without strict=
"""A TRL user's reward file, written as TRL's GRPO documentation writes reward functions
(https://huggingface.co/docs/trl/grpo_trainer, "Using a custom reward function"): keyword calls, every
dataset column as a keyword, ``**kwargs`` for the rest. The tests use it unchanged."""

import re


def reward_len(completions, **kwargs):
    """TRL's quick start: completions close to 20 characters (standard format: strings)."""
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """TRL's example 2: the R1 format (conversational format: one assistant message per completion)."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    """TRL's example 3: the boxed answer against a ``ground_truth`` column (standard format)."""
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def solution_reward(prompts, completions, solution, **kwargs):
    """1.0 for the ``solution``, -1.0 for an answer that only repeats words of the question, else 0.0
    (conversational format: a prompt is a message list whose last message asks the question)."""
    rewards = []
    for prompt, completion, sol in zip(prompts, completions, solution):
        content = prompt[-1]["content"]
        if not isinstance(content, str):  # a multimodal message: image and text parts
            content = " ".join(part["text"] for part in content if part["type"] == "text")
        answer = completion[0]["content"].strip().lower()
        if answer == sol:
            rewards.append(1.0)
        elif answer and set(answer.split()) <= set(content.lower().rstrip("?.").split()):
            rewards.append(-1.0)
        else:
            rewards.append(0.0)
    return rewards


async def async_reward(completions, **kwargs):
    """TRL also takes ``async def`` reward functions."""
    return [1.0 if completion else 0.0 for completion in completions]
