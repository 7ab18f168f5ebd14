"""Turning chat rows into model batches: chat template, label masks, images, padding.

Runs inside DataLoader workers, so images are decoded and processed off the training loop.
A batch is ``{"input_ids", "attention_mask", "vision": {...}, ...}`` where ``vision`` is whatever
the processor returned besides the text tensors (``pixel_values``, ``image_grid_thw``,
``mm_token_type_ids``, ``image_sizes``, ...), padded and stacked by the processor itself.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_vlm.data.rows import BASE, ROW, BadRowError

TEXT_KEYS = ("input_ids", "attention_mask")


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(
    processor, messages: list[dict], row: int, first: int = 0, field: str = "messages"
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages``; return the text and the character spans of the assistant replies at message
    index ``first`` or later (a preference pair's completion, not the earlier turns of its prompt).

    A span covers the reply and its end-of-turn token (so the model learns to stop), not the whitespace
    after it. Prefix renders must be prefixes of the full render, which holds for every mainstream chat
    template; if not, we refuse rather than guess.
    """
    text = render(processor, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < first:
            continue
        start = len(render(processor, messages[:i], add_generation_prompt=True)) if i else 0
        end_text = render(processor, messages[: i + 1])
        if not text.startswith(end_text):
            raise BadRowError(
                f"row {row}: the chat template does not render conversation prefixes as prefixes"
            )
        spans.append((start, len(end_text.rstrip())))
    if not spans:
        raise BadRowError(f"row {row}: field {field!r}: no assistant turn to learn from")
    return text, spans


def other_columns(rows: list[dict], consumed: tuple[str, ...]) -> dict[str, list]:
    """``{name: [value per row]}`` of every column a collator does not consume (per-row weights, labels)."""
    return {k: [r.get(k) for r in rows] for k in rows[0] if k not in (*consumed, ROW, BASE)}


def image_token_counts(processor, images: list) -> list[int] | None:
    """Image tokens each image expands to, from its size alone (None if the processor cannot say)."""
    counter = getattr(processor, "_get_num_multimodal_tokens", None)
    if counter is None or not images:
        return None if counter is None else []
    return list(counter(image_sizes=[(im.height, im.width) for im in images])["num_image_tokens"])


def _label_mask(
    processor, text: str, spans, expanded: list[int], row: int, counts: list[int] | None
) -> list[bool]:
    """Map character spans to the processor's (image-expanded) token sequence.

    Each image placeholder in ``text`` becomes ``counts[i]`` image tokens (or, when the counts are
    unknown, the whole run of image tokens, which needs placeholders separated by other tokens). The
    processor's ``image_token_ids`` are the tokens of that run: the image token, and any delimiters the
    processor adds around it (InternVL's ``<img>`` and ``</img>``).
    """
    tok = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    image_id = processor.image_token_id
    run = set(getattr(processor, "image_token_ids", None) or ()) | {image_id}
    mask, p, i = [False] * len(expanded), 0, 0
    for tid, (a, b) in zip(tok["input_ids"], tok["offset_mapping"], strict=True):
        if tid == image_id:
            end = p + counts[i] if counts is not None else p
            while counts is None and end < len(expanded) and expanded[end] in run:
                end += 1
            if end == p or end > len(expanded) or any(t not in run for t in expanded[p:end]):
                raise BadRowError(f"row {row}: image tokens do not line up with the processor's output")
            p, i = end, i + 1
            continue
        if p >= len(expanded) or expanded[p] != tid:
            raise BadRowError(f"row {row}: tokenisation differs from the processor's output at token {p}")
        mask[p] = b > a and any(s <= a and b <= e for s, e in spans)
        p += 1
    if p != len(expanded):
        raise BadRowError(f"row {row}: processor output has {len(expanded) - p} unexpected trailing tokens")
    return mask


def label_masks(processor, batch: dict, texts: list[str], spans: list, counts: list, rows: list[int]):
    """(N, T) bool: True on the tokens of each sequence's assistant spans (left padding allowed)."""
    masks = []
    for k, row in enumerate(rows):
        am = batch["attention_mask"][k].bool()
        ids = batch["input_ids"][k][am].tolist()
        row_mask = torch.zeros_like(am)
        row_mask[am] = torch.tensor(_label_mask(processor, texts[k], spans[k], ids, row, counts[k]))
        masks.append(row_mask)
    return torch.stack(masks)


def stack_blocks(blocks: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Stack encoded blocks of sequences that share the first block's images (vision once).

    Text tensors and per-sequence vision entries (shaped like ``input_ids``) are left-padded to a
    common length and concatenated; per-image entries (pixels, grids) are kept from the first block.
    """
    length = max(b["input_ids"].shape[1] for b in blocks)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (length - x.shape[1], 0), value=value)

    first = blocks[0]
    out: dict[str, Any] = {
        "input_ids": torch.cat([pad(b["input_ids"], pad_id) for b in blocks]),
        "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in blocks]),
        "vision": {},
    }
    for key, value in first["vision"].items():
        if isinstance(value, torch.Tensor) and value.shape[:2] == first["input_ids"].shape:  # per sequence
            out["vision"][key] = torch.cat([pad(b["vision"][key], 0) for b in blocks])
        else:
            out["vision"][key] = value
    return out


def encode(processor, texts: list[str], images: list, **kwargs) -> dict[str, Any]:
    """Run the processor on a batch; split text tensors from the one vision dict."""
    enc = processor(
        text=texts,
        images=images or None,
        padding=True,
        add_special_tokens=False,
        return_tensors="pt",
        **kwargs,
    )
    batch = {k: enc[k] for k in TEXT_KEYS}
    batch["vision"] = {k: v for k, v in enc.items() if k not in TEXT_KEYS}
    return batch


class _ProcessOnce:
    """A processor's image processor that runs once: later calls get the first result (encode_blocks)."""

    def __init__(self, inner):
        self.inner, self.out = inner, None

    def __getattr__(self, name: str):  # merge_size, fetch_images, ...: the real image processor's
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        if self.out is None:
            self.out = self.inner(*args, **kwargs)
        return self.out


def encode_blocks(processor, blocks: list[list[str]], images: list) -> list[dict[str, Any]]:
    """:func:`encode` each block of texts with the same ``images`` (blocks of sequences over the same
    prompts), running the image processor once: later blocks reuse its pixels and image-token counts."""
    inner = processor.image_processor
    processor.image_processor = _ProcessOnce(inner)
    try:
        return [encode(processor, texts, images) for texts in blocks]
    finally:
        processor.image_processor = inner
