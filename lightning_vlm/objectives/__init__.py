"""One LightningModule per objective; all subclass :class:`VLMObjective` (import paths are the registry)."""

from lightning_vlm.objectives.base import VLMObjective
from lightning_vlm.objectives.online import GRPO, GSPO, PPO, RLOO, OnlineObjective
from lightning_vlm.objectives.preference import DPO, MPO, RewardModel, RewardModelReward
from lightning_vlm.objectives.sft import SFT

__all__ = [
    "DPO",
    "GRPO",
    "GSPO",
    "MPO",
    "PPO",
    "RLOO",
    "SFT",
    "OnlineObjective",
    "RewardModel",
    "RewardModelReward",
    "VLMObjective",
]
