"""Everything about "a VLM": loading, LoRA, vision once, log-probs, generation, FSDP2, MoE, tiny
models. Knows nothing of objectives, rollouts or losses."""

from lightning_vlm.model.backbone import VLMBackbone
from lightning_vlm.model.config import BackboneConfig, LoraSettings
from lightning_vlm.model.tiny import TinyVLM

__all__ = ["BackboneConfig", "LoraSettings", "TinyVLM", "VLMBackbone"]
