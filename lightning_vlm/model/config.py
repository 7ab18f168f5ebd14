"""What a backbone is built from: the model, LoRA and training settings (the ``backbone:`` block of a
recipe), and the checkpoint they name. Kept apart from :mod:`lightning_vlm.model.backbone` so the
settings read on their own; ``lightning_vlm.model.backbone`` re-exports them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_vlm.model.tiny import TinyVLM, ensure_tiny_vlm


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
        disable_dropout: Zero every dropout (the model's, attention's and LoRA's) so that two forwards
            at the same weights give the same log-probs. ``null`` lets the objective choose: off for
            the preference, reward and online objectives, which compare log-probs across forwards
            (the on-policy ratio is then exactly 1), kept for SFT, where it regularises.
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
    disable_dropout: bool | None = None


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


def resolve_path(config: BackboneConfig) -> tuple[str, str | None]:
    """The checkpoint ``config`` names (the tiny model's cached folder, a hub id or a local folder) and,
    when that is a peft adapter folder, the adapter folder (the path is then its base model's)."""
    if (config.model_name_or_path is None) == (config.tiny is None):
        raise ValueError("backbone: set exactly one of `model_name_or_path` and `tiny`")
    if config.tiny is not None:
        return str(ensure_tiny_vlm(config.tiny)), None
    path = config.model_name_or_path
    local = path.startswith((".", "/", "~")) or path.count("/") > 1  # hub ids are "org/name"
    if local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"backbone.model_name_or_path: no model folder at {path}")
    path = str(Path(path).expanduser()) if path.startswith("~") else path
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file() and not (Path(path) / "config.json").is_file():
        return json.loads(adapter_config.read_text())["base_model_name_or_path"], path
    return path, None


def check_is_vlm(path: str, trust_remote_code: bool):
    """The checkpoint's transformers config, once it is known to describe a vision-language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not trust_remote_code:
        raise ValueError(
            f"{path}: model_type {config.model_type!r} is not a vision-language model "
            "(no AutoModelForImageTextToText class for it)"
        )
    return config
