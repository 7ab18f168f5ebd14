"""Offline preference objectives: DPO (IPO, hinge), MPO and the Bradley-Terry reward model."""

from lightning_vlm.objectives.preference.dpo import DPO
from lightning_vlm.objectives.preference.mpo import MPO
from lightning_vlm.objectives.preference.reward_model import RewardModel, RewardModelReward

__all__ = ["DPO", "MPO", "RewardModel", "RewardModelReward"]
