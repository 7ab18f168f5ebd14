"""Vision once: encode a batch's images once and share the features between sequences.

Several sequences per prompt (a preference pair's chosen and rejected, the G samples of a rollout
group) are laid out as ``copies`` blocks of B sequences; the B prompts' images are encoded once
and the features repeated block by block. transformers 5 models accept precomputed features as
``mm_encoder_outputs``, which is what this module builds.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn


def has_images(vision: dict[str, Any]) -> bool:
    """The batch carries pixels (a text-only batch may still carry ``mm_token_type_ids``)."""
    return any(key.startswith("pixel_") for key in vision)


def image_side_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every weight that image features depend on, by name: the inner model minus its language model
    (the vision tower and the projector, e.g. LLaVA's ``multi_modal_projector``, with any adapters)."""
    inner = model.model
    language = inner.get_decoder()  # language_model (Qwen, LLaVA), text_model (SmolVLM)
    if language is inner:  # an unknown layout: everything, so that nothing is wrongly shared
        return list(inner.named_parameters())
    skip = {id(p) for p in language.parameters()}
    return [(n, p) for n, p in inner.named_parameters() if id(p) not in skip]


def encode_images(model: nn.Module, params: list[tuple[str, nn.Parameter]], vision: dict[str, Any]) -> dict:
    """``{"image": output of the model's get_image_features}`` for the images in ``vision``.

    Gradients flow only when some of ``params`` (the image side's weights) train; a frozen image
    side encodes without keeping activations.
    """
    owner = model.model if hasattr(model.model, "get_image_features") else model
    fn = owner.get_image_features
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in vision.items() if k in accepted}
    trainable = any(p.requires_grad for _, p in params)
    with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
        return {"image": fn(**kwargs, return_dict=True)}


def shared_vision(vision: dict[str, Any], shape: tuple[int, int], copies: int, features: dict) -> dict:
    """The vision kwargs for ``copies`` blocks of sequences that share precomputed image features."""
    out: dict[str, Any] = {}
    for key, value in vision.items():
        if key.startswith("pixel_"):  # replaced by the features
            continue
        if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == shape:
            out[key] = value  # per sequence, already covers every row (mm_token_type_ids, ...)
        elif isinstance(value, torch.Tensor) and copies > 1:
            out[key] = torch.cat([value] * copies)  # per image (image_grid_thw, image_sizes, ...)
        else:
            out[key] = value
    out["mm_encoder_outputs"] = {m: _repeat_output(o, copies) for m, o in features.items()}
    return out


def _repeat(value: Any, copies: int) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.cat([value] * copies)
    return list(value) * copies  # one tensor per image


def _repeat_output(output: Any, copies: int) -> Any:
    """Image features of B prompts -> the same for ``copies`` blocks of B sequences (block order)."""
    if copies == 1:
        return output
    output = copy.copy(output)
    output.pooler_output = _repeat(output.pooler_output, copies)
    deep = getattr(output, "deepstack_features", None)  # Qwen3-VL: per layer, per image
    if deep is not None:
        output.deepstack_features = [_repeat(layer, copies) for layer in deep]
    return output
