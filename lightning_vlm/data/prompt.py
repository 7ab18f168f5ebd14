"""Prompt data for online RL (GRPO, GSPO, PPO): a prompt with its image(s) and any reference columns.

Rows are ``{"images", "prompt", "answer"?, ...}``. The prompt is a chat message list ending with a user
turn, or a plain string whose ``<image>`` markers place the images (without markers the images come
first). Every other column travels with the batch so that reward functions can take it as a keyword
(``answer``, ``task``, ``images``, ...). Public layouts map onto it with ``data.columns`` (docs/data.md):
multimodal-open-r1-8k-verified and CLEVR-style sets (``{images: image, prompt: problem, answer:
solution}``), geometry3k (``{prompt: problem}``, ``<image>`` markers in the problem).
"""

from __future__ import annotations

from typing import Any

from lightning_vlm.data.base import VLMDataModule
from lightning_vlm.data.collate import encode, other_columns, render
from lightning_vlm.data.preference import prompt_messages
from lightning_vlm.data.rows import BASE, ROW, as_list, open_image


def _clean(messages: list[dict]) -> list[dict]:
    """Drop the ``None`` fields Arrow adds when it unifies parts (``{"type": "image", "text": None}``)."""
    out = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, list):
            content = [{k: v for k, v in part.items() if v is not None} for part in content]
        out.append({**{k: v for k, v in msg.items() if v is not None}, "content": content})
    return out


def row_prompt(row: dict, system_prompt: str | None = None) -> list[dict]:
    """The row's prompt as chat messages (checked against its image count), after a system message
    with ``system_prompt`` unless the prompt has its own."""
    messages = _clean(prompt_messages(row["prompt"], len(as_list(row.get("images"))), row[ROW]))
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}, *messages]
    return messages


class PromptCollator:
    """Collate prompt rows into one left-padded batch of generation prompts: ``{"input_ids",
    "attention_mask", "vision", "rows", "split", "prompts", "images", "columns"}``. ``prompts`` holds each
    row's chat messages, ``images`` its opened RGB images and ``columns`` every other dataset column as
    ``{name: [value per row]}`` (``columns["images"]`` is ``images``), for the reward functions.

    Args:
        processor: The backbone's processor (left padding).
        split: Name of the split, carried in the batch.
        system_prompt: System message put before prompts that have none.
    """

    def __init__(self, processor, split: str = "train", system_prompt: str | None = None):
        self.processor = processor
        self.split = split
        self.system_prompt = system_prompt

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        prompts = [row_prompt(r, self.system_prompt) for r in rows]
        texts = [render(self.processor, p, add_generation_prompt=True) for p in prompts]
        images = [[open_image(ref, r[BASE], r[ROW]) for ref in as_list(r.get("images"))] for r in rows]
        batch = encode(self.processor, texts, [im for row_images in images for im in row_images])
        columns = other_columns(rows, ("prompt",))
        columns["images"] = images
        # Rewards get each row's own prompt: a reward model was trained without data.system_prompt.
        own = [row_prompt(r) for r in rows] if self.system_prompt else prompts
        batch.update(
            rows=[r[ROW] for r in rows], split=self.split, prompts=prompts, row_prompts=own, images=images,
            columns=columns,
        )  # fmt: skip
        return batch


class PromptDataModule(VLMDataModule):
    """Prompts with images for online RL: GRPO, GSPO and PPO (docs/data.md).

    Each batch holds B left-padded generation prompts; the rollout samples completions from them
    and scores them with reward functions that receive the rows' columns as keywords.
    ``max_length`` and ``overlong`` apply to the prompt (image tokens included).
    """

    required = ("images", "prompt")

    def __init__(self, *args: Any, system_prompt: str | None = None, **kwargs: Any):
        """
        Args:
            *args: Sources and loader settings of :class:`~lightning_vlm.data.base.VLMDataModule`.
            system_prompt: System message put before every prompt that has none, e.g. the output
                format the rewards expect (``<think>...</think><answer>...</answer>``).
            **kwargs: See :class:`~lightning_vlm.data.base.VLMDataModule` (train, val, columns, ...).
        """
        super().__init__(*args, **kwargs)
        self.system_prompt = system_prompt

    def _check_row(self, row: dict) -> int:
        prompt = row_prompt(row, self.system_prompt)
        images = self.images_of(row, len(as_list(row.get("images"))), "prompt")
        return self.token_length(render(self.processor, prompt, add_generation_prompt=True), images)

    def _collator(self, split: str) -> PromptCollator:
        return PromptCollator(self.processor, split, self.system_prompt)
