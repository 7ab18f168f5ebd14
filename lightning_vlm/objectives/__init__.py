"""One LightningModule per objective; all subclass :class:`VLMObjective`."""

from lightning_vlm.objectives.base import VLMObjective
from lightning_vlm.objectives.sft import SFT

__all__ = ["SFT", "VLMObjective"]
