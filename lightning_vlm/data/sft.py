"""Supervised fine-tuning data: chat conversations (or TRL's prompt-completion rows) with images, loss on
the assistant's tokens only; every other column travels with the batch in ``columns``."""

from __future__ import annotations

from typing import Any

from lightning_vlm.data.base import VLMDataModule
from lightning_vlm.data.collate import assistant_spans, encode_blocks, label_masks, other_columns, render
from lightning_vlm.data.packing import TokenBudgetSampler
from lightning_vlm.data.preference import prompt_messages, response_messages
from lightning_vlm.data.rows import BASE, ROW, BadRowError, as_list, count_image_parts, open_image
from lightning_vlm.data.sources import source_name

CONSUMED = ("messages", "prompt", "completion", "images")  # the rest goes to batch["columns"]


def sft_messages(row: dict) -> tuple[Any, int]:
    """The row as chat messages, and the index of the first one that carries loss: 0 for a chat row
    (every assistant turn), the completion's first for a prompt-completion row (the prompt is context)."""
    i, (messages, prompt, completion) = row[ROW], (row.get(k) for k in ("messages", "prompt", "completion"))
    if messages is not None and completion is not None:
        raise BadRowError(f"row {i}: has both 'messages' and 'completion'; give one of the two formats")
    if messages is not None or (prompt is None and completion is None):
        return messages, 0  # a missing or bad one is named by the checks of messages
    if prompt is None or completion is None:
        field = "prompt" if prompt is None else "completion"
        raise BadRowError(
            f"row {i}: field {field!r} is missing: a row holds 'messages', or 'prompt' and 'completion'"
        )
    prompt = prompt_messages(prompt, len(as_list(row.get("images"))), i)
    return prompt + response_messages(completion, i, "completion"), len(prompt)


def strip_final_answer(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation into the prompt (all but the last assistant turn) and that turn's text."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return messages[:-1], content
    return messages[:-1], "".join(p["text"] for p in content if p.get("type") == "text")


class SFTCollator:
    """Collate SFT rows: loss mask on assistant tokens, optional generation prompts for evaluation.

    Args:
        processor: The backbone's processor (left padding).
        with_prompts: Also encode each conversation minus its last reply, left-padded for
            generation, with the reference reply in ``answers`` (and, for the samples table, the
            prompts as messages in ``prompts`` and each row's images in ``images``).
        packed: Mark the batch for the padding-free packed forward (``data.packing``).
    """

    def __init__(self, processor, with_prompts: bool = False, packed: bool = False):
        self.processor = processor
        self.with_prompts = with_prompts
        self.packed = packed

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        texts, spans, images, conversations, per_row = [], [], [], [], []
        for r in rows:
            messages, first = sft_messages(r)
            field = "messages" if first == 0 else "completion"
            text, sp = assistant_spans(self.processor, messages, r[ROW], first, field)
            texts.append(text)
            spans.append(sp)
            conversations.append(messages)
            row_images = [open_image(ref, r[BASE], r[ROW]) for ref in as_list(r["images"])]
            images += row_images
            per_row.append(row_images)
        blocks = [texts]
        if self.with_prompts:  # a second block with the same images: they are processed once for both
            prompts, answers = zip(*(strip_final_answer(m) for m in conversations), strict=True)
            blocks.append([render(self.processor, p, add_generation_prompt=True) for p in prompts])
        batch, *prompt = encode_blocks(self.processor, blocks, images, replacements=True)
        ids = [r[ROW] for r in rows]
        batch["labels_mask"] = label_masks(self.processor, batch, texts, spans, ids)
        batch["rows"] = ids
        batch["columns"] = other_columns(rows, CONSUMED)
        batch["packed"] = self.packed  # the model runs the rows as one padding-free sequence
        if self.with_prompts:
            prompt[0].pop("replacements")  # the prompts have no labels to map
            batch["prompt"], batch["answers"] = prompt[0], list(answers)
            batch["prompts"], batch["images"] = list(prompts), per_row  # for the samples table
        return batch


class SFTDataModule(VLMDataModule):
    """Rows ``{"images": [...], "messages": [...]}`` in the chat format, or TRL's prompt-completion rows
    ``{"images", "prompt", "completion"}`` (docs/data.md).

    Images may appear in any user turn, several per row; the loss covers every assistant turn of a chat
    row, and the completion of a prompt-completion row. Other columns (a per-row ``weight``, a label)
    reach the objective in ``batch["columns"]``. Validation batches also carry generation prompts (the
    conversation minus its last reply) so the objective can report exact-match accuracy.
    """

    required = ("messages", "images")
    alternatives = {"messages": ("prompt", "completion")}  # TRL's prompt-completion format

    def __init__(self, packing: bool = False, max_tokens: int | None = None, **kwargs: Any):
        """
        Args:
            packing: Train on padding-free packed micro-batches: each micro-batch's rows run as one
                sequence, attention kept inside each row, filled up to ``max_tokens`` tokens (image tokens
                counted) instead of ``batch_size`` rows. Same loss as padded batches of the same rows
                (docs/data.md#packing). Refused, when fit starts, for families that cannot be packed.
            max_tokens: Token budget of a packed micro-batch (per device); required with ``packing`` and
                at least ``max_length``, so every row fits (a longer row is refused or dropped by
                ``max_length`` and ``overlong``, naming the row and its length).
            **kwargs: The settings of :class:`VLMDataModule` (train, val, batch_size, max_length, ...).
        """
        super().__init__(**kwargs)
        self.streams = not packing  # the token budget needs every row's length before the epoch starts
        limit = self.hparams["max_length"]
        if packing and (max_tokens is None or max_tokens < limit):
            raise ValueError(f"data.init_args.max_tokens must be >= max_length ({limit}) "
                             f"with packing, got {max_tokens}")  # fmt: skip

    def _train_sampler(self, world: int, rank: int):
        h = self.hparams
        if not h["packing"]:
            return super()._train_sampler(world, rank)
        ds, name = self.datasets["train"], source_name(self.sources["train"] or "")
        sampler = TokenBudgetSampler(self.lengths[name], ds[ROW], h["max_tokens"], h["seed"], name, world, rank)
        sampler.resume_at(*self._resume)  # (epoch, micro-batches used): see state_dict
        return sampler

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if "resume" in state and self._budget():  # its count is in micro-batches of this budget, not rows
            state["resume"]["packed_max_tokens"] = self._budget()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        resume = state.get("resume") or {}
        saved, now = resume.get("packed_max_tokens"), self._budget()
        if resume.get("rows") and saved != now:  # the count would point at other rows: refuse, lose nothing
            raise ValueError(
                f"resuming: the checkpoint counts its data position in {_unit(saved)}, this run in "
                f"{_unit(now)}; resume with the checkpoint's data.packing and data.max_tokens"
            )
        super().load_state_dict(state)

    def _rows_per_batch(self) -> int:
        return 1 if self.hparams["packing"] else super()._rows_per_batch()  # packed: micro-batches

    def _budget(self) -> int | None:
        return self.hparams["max_tokens"] if self.hparams["packing"] else None

    def _check_row(self, row: dict) -> int:
        messages, first = sft_messages(row)
        i, field = row[ROW], "messages" if first == 0 else "prompt"
        n_images = count_image_parts(messages, i, field)
        if messages[-1].get("role") != "assistant":
            raise BadRowError(f"row {i}: field 'messages': the last message must be the assistant's reply")
        self.check_replies(messages[first:], i, "messages" if first == 0 else "completion")
        images = self.images_of(row, n_images, field)
        return self.token_length(render(self.processor, messages), images)

    def _collator(self, split: str) -> SFTCollator:
        packed = split == "train" and self.hparams["packing"]
        return SFTCollator(self.processor, with_prompts=split != "train", packed=packed)


def _unit(budget: int | None) -> str:
    return "rows" if budget is None else f"packed micro-batches of data.max_tokens {budget}"
