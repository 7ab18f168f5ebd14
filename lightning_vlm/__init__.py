"""lightning-vlm: align vision-language models with PyTorch Lightning."""

from lightning_vlm.backbone import VLMBackbone
from lightning_vlm.settings import BackboneConfig, LoraSettings
from lightning_vlm.tiny import TinyVLM

__all__ = ["BackboneConfig", "LoraSettings", "TinyVLM", "VLMBackbone"]
__version__ = "0.1.0"
