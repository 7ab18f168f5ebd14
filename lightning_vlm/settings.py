"""What a backbone is built from: the model, LoRA and training settings (the ``backbone:`` block of a
recipe). Kept apart from :mod:`lightning_vlm.backbone` so the settings read on their own;
``lightning_vlm.backbone`` re-exports them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_vlm.tiny import TinyVLM


@dataclass
class LoraSettings:
    """LoRA adapters (peft).

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter input.
        target_modules: Leaf names of the language model's linear layers to adapt (e.g.
            ``[q_proj, v_proj]``), or ``all-linear`` for all of them (never the LM head).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass
class BackboneConfig:
    """Which VLM to load and how to train it.

    Args:
        model_name_or_path: Hub id (e.g. ``Qwen/Qwen2-VL-2B-Instruct``) or local folder; a peft
            adapter folder (``adapter_config.json``) loads its base model with the adapters merged.
        tiny: Build a tiny random-initialised VLM offline instead (cached on disk) and load it
            like any checkpoint. Exactly one of ``model_name_or_path`` and ``tiny`` is set.
        dtype: Dtype of the loaded weights; ``auto`` keeps the checkpoint's. Full fine-tuning with
            ``bf16-mixed`` precision wants ``float32`` (fp32 master weights); under LoRA ``bfloat16``
            halves the frozen weights' memory while peft keeps the adapters in fp32.
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``, ...
        trust_remote_code: Run custom code shipped with the checkpoint. Off unless you trust it.
        lora: LoRA settings; ``null`` trains the weights themselves.
        vision: ``frozen`` (default), ``train`` (full weights) or ``lora`` (adapters on every
            linear layer of the vision tower too, whatever ``lora.target_modules`` says; needs ``lora``).
        gradient_checkpointing: Recompute activations in backward to save memory.
        logps_chunk_size: Target tokens per LM-head chunk when computing log-probs; bounds the
            logits held in memory to ``chunk x vocab``.
        processor_kwargs: Extra image-processor settings, e.g. ``{min_pixels: 3136, max_pixels: 200704}``.
    """

    model_name_or_path: str | None = None
    tiny: TinyVLM | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    lora: LoraSettings | None = None
    vision: Literal["frozen", "train", "lora"] = "frozen"
    gradient_checkpointing: bool = False
    logps_chunk_size: int = 1024
    processor_kwargs: dict[str, Any] = field(default_factory=dict)


def as_backbone_config(value: BackboneConfig | dict) -> BackboneConfig:
    """Accept the dataclass or its dict form (as stored in checkpoint hyperparameters)."""
    if isinstance(value, BackboneConfig):
        return value
    value = dict(value)
    if isinstance(value.get("tiny"), dict):
        value["tiny"] = TinyVLM(**value["tiny"])
    if isinstance(value.get("lora"), dict):
        value["lora"] = LoraSettings(**value["lora"])
    return BackboneConfig(**value)
