"""The tensors an engine that holds its own copy of the policy reloads after an optimiser step.

Only what training changes goes: the trained parameters, or the LoRA-adapted layers as merged weights. An
inference engine fuses layers (vLLM: q/k/v into one, gate/up into one) and processes each fused layer once
all its tensors have arrived, so a changed layer travels with the rest of its block (a module whose children
are all layers, e.g. an attention or MLP block). Names are the Hugging Face checkpoint's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def changed_weights(model: nn.Module, everything: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) to reload: every parameter, or those of each block (a module whose
    children are all leaves, e.g. an attention or MLP block) or leaf module that holds a trained
    parameter. A LoRA-adapted layer goes as its merged weight ``W + scale * B @ A``, computed aside:
    merging in place and back would leave rounding drift in the trainer's base weights."""
    from peft.tuners.lora import LoraLayer

    deltas = {
        _checkpoint_name(f"{name}.base_layer.weight"): _delta(m)
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and not m.merged
    }
    chosen = _chosen_modules(model, everything)
    for module_name, module in model.named_modules():
        if module_name not in chosen:
            continue
        for name, p in module.named_parameters():
            if "lora_" in name:
                continue
            full = _checkpoint_name(f"{module_name}.{name}" if module_name else name)
            tensor = _full(p).detach()
            yield full, (tensor + _full(deltas[full]).to(tensor.dtype) if full in deltas else tensor)


def _chosen_modules(model: nn.Module, everything: bool) -> set[str]:
    if everything:
        return {""}
    from peft.tuners.lora import LoraLayer

    def is_layer(m: nn.Module) -> bool:  # a leaf, or a LoRA-wrapped leaf
        return isinstance(m, LoraLayer) or not list(m.children())

    names: set[str] = set()
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rsplit(".", 1)[0].split(".lora_")[0]  # an adapter's: the layer it adapts
        owner = owner.removesuffix(".base_layer")
        parent = owner.rsplit(".", 1)[0] if "." in owner else ""
        block = modules.get(parent)
        is_block = parent and block is not None and all(is_layer(c) for c in block.children())
        names.add(parent if is_block else owner)
    # A chosen block contains its chosen layers: keep only the outermost names.
    return {n for n in names if not any(n.startswith(o + ".") for o in names if o != n)}


def _checkpoint_name(name: str) -> str:
    """The Hugging Face checkpoint name of a (possibly peft-wrapped) parameter."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor), or the tensor itself."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _delta(layer: Any) -> torch.Tensor:
    """A LoRA layer's weight update ``scale * B @ A``, summed over its active adapters."""
    return torch.stack([layer.get_delta_weight(a) for a in layer.active_adapters]).sum(0)
