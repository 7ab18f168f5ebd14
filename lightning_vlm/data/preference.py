"""Preference data: a prompt with its image(s), a chosen and a rejected response, optional margin.

Rows are ``{"images", "prompt", "chosen", "rejected", "margin"?}``. The prompt is a chat message
list or a plain string; chosen and rejected are assistant message lists or plain strings. Common
public layouts map onto it with ``data.columns`` (docs/data.md): RLAIF-V
(``{images: image, prompt: question}``) and MMPR (the same, with ``<image>`` markers in the question).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler

from lightning_vlm.data.base import VLMDataModule, naming_source
from lightning_vlm.data.collate import (
    assistant_spans,
    encode_blocks,
    label_masks,
    other_columns,
    stack_blocks,
)
from lightning_vlm.data.rows import BASE, ROW, BadRowError, as_list, count_image_parts, open_image
from lightning_vlm.data.sources import source_name

IMAGE_MARKER = re.compile(r"<image>\n?")


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def prompt_messages(value: Any, n_images: int, row: int) -> list[dict]:
    """The prompt as chat messages. A string becomes one user turn: its ``<image>`` markers become
    the images, in order; without markers the images come first."""
    if isinstance(value, str):
        pieces = IMAGE_MARKER.split(value)
        if len(pieces) == 1:
            return [{"role": "user", "content": [{"type": "image"}] * n_images + [_text(value)]}]
        if len(pieces) - 1 != n_images:
            raise BadRowError(
                f"row {row}: field 'prompt' has {len(pieces) - 1} <image> marker(s) but 'images' lists {n_images}"
            )
        parts = []
        for k, piece in enumerate(pieces):
            if k:
                parts.append({"type": "image"})
            if piece:
                parts.append(_text(piece))
        return [{"role": "user", "content": parts}]
    found = count_image_parts(value, row, "prompt")
    if found != n_images:
        raise BadRowError(
            f"row {row}: field 'prompt' has {found} image part(s) but 'images' lists {n_images}"
        )
    if value[-1]["role"] != "user":
        raise BadRowError(f"row {row}: field 'prompt': the last message must be the user's")
    return list(value)


def response_messages(value: Any, row: int, field: str) -> list[dict]:
    """A chosen/rejected response as assistant messages (a string is one assistant turn)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": [_text(value)]}]
    if count_image_parts(value, row, field):
        raise BadRowError(f"row {row}: field {field!r}: images belong in the prompt, not the response")
    if value[-1]["role"] != "assistant":
        raise BadRowError(f"row {row}: field {field!r}: the last message must be the assistant's")
    return list(value)


def pair_messages(row: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) chat messages of a preference row."""
    i = row[ROW]
    prompt = prompt_messages(row["prompt"], len(as_list(row.get("images"))), i)
    chosen, rejected = (response_messages(row[k], i, k) for k in ("chosen", "rejected"))
    return prompt, chosen, rejected


class PreferenceCollator:
    """Collate preference rows into one batch of 2B sequences: B chosen, then B rejected.

    Args:
        processor: The backbone's processor (left padding).
        vision_once: Keep each prompt's images once (``batch["copies"] == 2``: the model encodes them
            once and both blocks reuse the features). When False every sequence carries its own copy
            of the images, as most trainers do (the benchmark's baseline).
        split: Name of the split, carried in the batch (keys of precomputed reference log-probs).
    """

    def __init__(self, processor, vision_once: bool = True, split: str = "train"):
        self.processor = processor
        self.vision_once = vision_once
        self.split = split

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        texts: list[list[str]] = [[], []]
        spans: list[list] = [[], []]
        images, pairs, per_row = [], [], []
        for r in rows:
            prompt, chosen, rejected = pair_messages(r)
            pairs.append((prompt, chosen, rejected))
            for k, (response, field) in enumerate(((chosen, "chosen"), (rejected, "rejected"))):
                text, sp = assistant_spans(self.processor, prompt + response, r[ROW], len(prompt), field)
                texts[k].append(text)
                spans[k].append(sp)
            row_images = [open_image(ref, r[BASE], r[ROW]) for ref in as_list(r["images"])]
            images += row_images
            per_row.append(row_images)
        if self.vision_once:
            # each image processed once
            blocks = encode_blocks(self.processor, texts, images, replacements=True)
            batch = stack_blocks(blocks, self.processor.tokenizer.pad_token_id)
        else:
            both = [texts[0] + texts[1]]
            batch = encode_blocks(self.processor, both, images + images, replacements=True)[0]
        ids = [r[ROW] for r in rows]
        batch["labels_mask"] = label_masks(
            self.processor, batch, texts[0] + texts[1], spans[0] + spans[1], ids + ids
        )  # (2B, T)
        batch["copies"] = 2 if self.vision_once else 1
        batch["rows"] = ids
        batch["split"] = self.split
        batch["columns"] = other_columns(rows, ("images", "prompt", "chosen", "rejected", "margin"))
        if "margin" in rows[0]:
            batch["margin"] = [float(r["margin"]) for r in rows]
        if self.split != "train":  # for the samples table
            batch["prompts"], batch["chosen"], batch["rejected"] = (list(m) for m in zip(*pairs, strict=True))
            batch["images"] = per_row
        return batch


class PreferenceDataModule(VLMDataModule):
    """Preference pairs with images for DPO, MPO and reward models (docs/data.md).

    Each batch holds the B chosen sequences followed by the B rejected ones; the prompt's images
    are processed once per pair (``vision_once``).
    """

    required = ("images", "prompt", "chosen", "rejected")
    streams = False  # the reference log-probs are computed over the whole split before training

    def __init__(self, *args: Any, vision_once: bool = True, **kwargs: Any):
        """
        Args:
            *args: Sources and loader settings of :class:`~lightning_vlm.data.base.VLMDataModule`.
            vision_once: Encode each prompt's images once for its chosen and rejected sequences.
                False gives every sequence its own copy (what most trainers do; for comparison).
            **kwargs: See :class:`~lightning_vlm.data.base.VLMDataModule` (train, val, columns, ...).
        """
        super().__init__(*args, **kwargs)
        self.vision_once = vision_once

    def _check_row(self, row: dict) -> int:
        i = row[ROW]
        prompt, chosen, rejected = pair_messages(row)
        images = self.images_of(row, len(as_list(row.get("images"))), "prompt")
        if "margin" in row and not isinstance(row["margin"], (int, float)):
            raise BadRowError(f"row {i}: field 'margin': expected a number, got {row['margin']!r}")
        lengths = []
        for response, field in ((chosen, "chosen"), (rejected, "rejected")):
            self.check_replies(response, i, field)
            text, _ = assistant_spans(self.processor, prompt + response, i, len(prompt), field)
            lengths.append(self.token_length(text, images))
        return max(lengths)

    def _collator(self, split: str) -> PreferenceCollator:
        return PreferenceCollator(self.processor, self.vision_once, split)

    def scan_dataloader(self, split: str) -> DataLoader:
        """Every row of ``split`` once, in order, this rank's share (for precomputing reference log-probs)."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        h = self.hparams
        return DataLoader(
            self.datasets[split],
            batch_size=h.eval_batch_size or h.batch_size,
            num_workers=h.num_workers,
            collate_fn=partial(naming_source, self._collator(split), source_name(self.sources[split])),
            sampler=DistributedSampler(self.datasets[split], world, rank, shuffle=False),
        )
