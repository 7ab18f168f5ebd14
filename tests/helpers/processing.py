"""Counters for "each image once": images per call of a processor's image processor, and images per call
of a Qwen-VL vision tower."""

from __future__ import annotations

from torch import nn
from transformers.image_utils import make_flat_list_of_images


def count_image_processing(monkeypatch, processor) -> list[int]:
    """Images handed to ``processor``'s image processor, one entry per call (its class's ``__call__``
    is wrapped for the test); a list of each text's images counts its images."""
    seen: list[int] = []
    cls = type(processor.image_processor)
    call = cls.__call__

    def counted(self, images, *args, **kwargs):
        seen.append(len(make_flat_list_of_images(images)))  # encode() hands them over as one list per text
        return call(self, images, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counted)
    return seen


def count_tower_images(tower: nn.Module) -> list[int]:
    """Images a Qwen-VL vision tower encodes, one entry per call (rows of its ``grid_thw``)."""
    seen: list[int] = []
    tower.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs["grid_thw"].shape[0]), with_kwargs=True
    )
    return seen


def tower_input(args: tuple, kwargs: dict):
    """The pixels a vision tower's forward got: positionally (Qwen-VL, CLIP) or by keyword (InternVL)."""
    return args[0] if args else kwargs["pixel_values"]
