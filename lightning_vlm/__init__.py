"""lightning-vlm: align vision-language models with PyTorch Lightning."""

from lightning_vlm.model import BackboneConfig, LoraSettings, TinyVLM, VLMBackbone

__all__ = ["BackboneConfig", "LoraSettings", "TinyVLM", "VLMBackbone"]
__version__ = "0.1.0"
