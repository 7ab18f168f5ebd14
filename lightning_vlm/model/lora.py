"""Surgery on a loaded model: LoRA adapters on the language model (and optionally the vision tower)
with peft, and switching dropout off."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn


def add_lora(model: nn.Module, lora: Any, vision_mode: str, tower: nn.Module, tower_name: str) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters per ``lora`` (a LoraSettings) and the vision mode."""
    from peft import LoraConfig, get_peft_model

    vision_ids = {id(m) for m in tower.modules()}
    head = model.get_output_embeddings()
    wanted = None if lora.target_modules == "all-linear" else set(lora.target_modules)
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod is head:
            continue
        if id(mod) in vision_ids:  # vision layer names differ per family: adapt them all
            if vision_mode == "lora":
                names.append(name)
        elif wanted is None or name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
    if not names:
        raise ValueError(f"backbone.lora.target_modules: no linear layer matches {lora.target_modules!r}")
    if any(name.endswith(".experts") and not isinstance(m, nn.Linear) for name, m in model.named_modules()):
        warnings.warn(
            "backbone.lora: fused MoE expert weights are not nn.Linear layers and get no adapters "
            "(only the nn.Linear layers, e.g. attention projections, are adapted)",
            stacklevel=2,
        )
    # vision: train under LoRA trains a copy of the tower (peft's modules_to_save), so that the
    # disabled-adapter reference still sees the original tower and adapter exports include it.
    keep = [tower_name] if vision_mode == "train" else None
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names, modules_to_save=keep
    )
    return get_peft_model(model, peft_config)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def disable_dropout(model: nn.Module) -> int:
    """Zero every dropout of ``model`` in place, the modules' and the attention's (HF attention layers
    keep a float ``attention_dropout`` or ``dropout`` they apply in training mode), LoRA's included.

    The model stays in training mode (``eval()`` would also switch off gradient checkpointing), and its
    config is untouched, so an export keeps the checkpoint's dropout settings. Returns how many were set.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p:
            module.p, count = 0.0, count + 1
        for attr in ("attention_dropout", "dropout"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and value:
                setattr(module, attr, 0.0)
                count += 1
    return count
