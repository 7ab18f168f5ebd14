"""One LightningModule per objective; all subclass :class:`VLMObjective`."""

from lightning_vlm.objectives.base import VLMObjective
from lightning_vlm.objectives.dpo import DPO
from lightning_vlm.objectives.grpo import GRPO
from lightning_vlm.objectives.gspo import GSPO
from lightning_vlm.objectives.mpo import MPO
from lightning_vlm.objectives.ppo import PPO
from lightning_vlm.objectives.reward_model import RewardModel
from lightning_vlm.objectives.sft import SFT

__all__ = ["DPO", "GRPO", "GSPO", "MPO", "PPO", "SFT", "RewardModel", "VLMObjective"]
