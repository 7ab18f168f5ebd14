"""Turning chat rows into model batches: chat template, label masks, images, padding.

Runs inside DataLoader workers, so images are decoded and processed off the training loop.
A batch is ``{"input_ids", "attention_mask", "vision": {...}, ...}`` where ``vision`` is whatever
the processor returned besides the text tensors (``pixel_values``, ``image_grid_thw``,
``mm_token_type_ids``, ``image_sizes``, ...), padded and stacked by the processor itself.
"""

from __future__ import annotations

import functools
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
    """Image tokens each image expands to, from its size alone (None if the processor cannot say, or if its
    expansion holds more than those tokens: Gemma's begin/end-of-image tokens and newlines)."""
    counter = getattr(processor, "_get_num_multimodal_tokens", None)
    if counter is None or not _expands_to_image_tokens_only(processor):
        return None
    if not images:
        return []
    return list(counter(image_sizes=[(im.height, im.width) for im in images])["num_image_tokens"])


@functools.lru_cache(maxsize=16)
def _expands_to_image_tokens_only(processor) -> bool:
    """One probe per processor: do one and two placeholders become exactly the image tokens it counts (two
    images of one prompt: LLaVA-OneVision expands them differently from one)?"""
    from PIL import Image

    token = getattr(processor, "image_token", None)
    if token is None:
        return False
    image = Image.new("RGB", (64, 64))
    count = processor._get_num_multimodal_tokens(image_sizes=[(64, 64)])["num_image_tokens"][0]
    for n in (1, 2):
        ids = processor(text=[token * n], images=[[image] * n], add_special_tokens=False)["input_ids"][0]
        if len(ids) != n * count:
            return False
    return True


def _label_mask(
    processor, text: str, spans, expanded: list[int], row: int, replacements: list[dict]
) -> list[bool]:
    """Map character spans of ``text`` to the processor's (image-expanded) token sequence.

    ``replacements`` (the processor's ``text_replacement_offsets``) says where each image placeholder's
    expansion sits in the text the processor tokenised: a run of image tokens (Qwen, LLaVA) or one with
    other tokens around it (Gemma 3's newlines and begin/end-of-image tokens). That text is tokenised
    with offsets; spans move with the expansions before them; tokens of an expansion are never labels.
    """
    pieces, expansions, last, shift = [], [], 0, [(0, 0)]  # shift: (position in text, offset from then on)
    for r in replacements:
        (a, b), (na, nb) = r["span"], r["new_span"]
        pieces += [text[last:a], r["replacement"]]
        expansions.append((na, nb))
        shift.append((b, shift[-1][1] + (nb - na) - (b - a)))
        last = b
    full = "".join(pieces) + text[last:]

    def moved(x: int) -> int:
        return x + [off for at, off in shift if at <= x][-1]

    spans = [(moved(s), moved(e)) for s, e in spans]
    tok = processor.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ours = tok["input_ids"]
    if ours != expanded:
        at = next((i for i, (x, y) in enumerate(zip(ours, expanded, strict=False)) if x != y), len(ours))
        raise BadRowError(f"row {row}: tokenisation differs from the processor's output at token {at}")
    return [
        b > a and any(s <= a and b <= e for s, e in spans) and not any(na <= a < nb for na, nb in expansions)
        for a, b in tok["offset_mapping"]
    ]


def label_masks(processor, batch: dict, texts: list[str], spans: list, rows: list[int]):
    """(N, T) bool: True on the tokens of each sequence's assistant spans (left padding allowed). Takes
    ``batch["replacements"]`` (from :func:`encode` with ``replacements=True``) out of the batch."""
    masks = []
    replacements = batch.pop("replacements")
    for k, row in enumerate(rows):
        am = batch["attention_mask"][k].bool()
        ids = batch["input_ids"][k][am].tolist()
        row_mask = torch.zeros_like(am)
        row_mask[am] = torch.tensor(_label_mask(processor, texts[k], spans[k], ids, row, replacements[k]))
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
    if "replacements" in first:
        out["replacements"] = [r for b in blocks for r in b["replacements"]]
    for key, value in first["vision"].items():
        if isinstance(value, torch.Tensor) and value.shape[:2] == first["input_ids"].shape:  # per sequence
            out["vision"][key] = torch.cat([pad(b["vision"][key], 0) for b in blocks])
        else:
            out["vision"][key] = value
    return out


def encode(processor, texts: list[str], images: list, replacements: bool = False, **kwargs) -> dict[str, Any]:
    """Run the processor on a batch; split text tensors from the one vision dict. ``replacements``: also keep
    where each image placeholder's expansion sits in each text, for :func:`label_masks`."""
    # The images as one list per text: Gemma's processors need it, the others flatten it.
    token = getattr(processor, "image_token", None)
    counts = [t.count(token) for t in texts] if token else []
    if images and sum(counts) == len(images):
        it = iter(images)
        images = [[next(it) for _ in range(n)] for n in counts]
    enc = processor(
        text=texts,
        images=images or None,
        padding=True,
        add_special_tokens=False,
        return_tensors="pt",
        return_text_replacement_offsets=replacements,
        **kwargs,
    )
    batch = {k: enc[k] for k in TEXT_KEYS}
    if replacements:
        batch["replacements"] = enc.pop("text_replacement_offsets", None) or [[] for _ in texts]
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


def encode_blocks(
    processor, blocks: list[list[str]], images: list, replacements: bool = False
) -> list[dict[str, Any]]:
    """:func:`encode` each block of texts with the same ``images`` (blocks of sequences over the same
    prompts), running the image processor once: later blocks reuse its pixels and image-token counts."""
    inner = processor.image_processor
    processor.image_processor = _ProcessOnce(inner)
    try:
        return [encode(processor, texts, images, replacements) for texts in blocks]
    finally:
        processor.image_processor = inner
