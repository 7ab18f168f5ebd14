"""Shared helpers of the SFT data tests: images drawn on disk, chat messages, JSONL sources, a set-up
datamodule and its one batch."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from lightning_vlm.data import SFTDataModule

END = "<|im_end|>"


GEN_PROMPT = "<|im_start|>assistant\n"


def draw(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    """Save a PNG with one filled ellipse at ``path`` (``<dir>/img/x.png``); return ``img/x.png``."""
    image = Image.new("RGB", size, (255, 255, 255))
    w, h = size
    ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return f"{path.parent.name}/{path.name}"


def noisy_png(path: Path, size: int = 96) -> bytes:
    """A PNG of random pixels (large, barely compressible), saved at ``path``; return its bytes."""
    rng = random.Random(0)
    Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(path)
    return path.read_bytes()


def user(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def datamodule(processor, train: str, val: str | None = None, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(train=train, val=val, **kwargs)
    dm.processor = processor
    dm.setup("fit")
    return dm


def one_batch(dm: SFTDataModule, split: str = "train") -> dict:
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    batches = list(loader)
    assert len(batches) == 1, "the tests size batches to hold the whole split"
    return batches[0]


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of True."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def real_ids(batch: dict, k: int) -> list[int]:
    return batch["input_ids"][k][batch["attention_mask"][k].bool()].tolist()


def expected_image_tokens(processor, messages: list[dict], images: list[Image.Image]) -> int:
    """Image tokens the processor itself produces for one conversation, with no length limit."""
    text = processor.apply_chat_template(messages, tokenize=False)
    enc = processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt")
    return int((enc["input_ids"] == processor.image_token_id).sum())
