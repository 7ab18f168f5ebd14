"""Online RL objectives: one base (the protocol and the shared update loop), one file per algorithm."""

from lightning_vlm.objectives.online.base import Chunk, OnlineObjective, OnlineSettings, RolloutNeeds
from lightning_vlm.objectives.online.grpo import GRPO
from lightning_vlm.objectives.online.gspo import GSPO
from lightning_vlm.objectives.online.ppo import PPO
from lightning_vlm.objectives.online.rloo import RLOO

__all__ = ["GRPO", "GSPO", "PPO", "RLOO", "Chunk", "OnlineObjective", "OnlineSettings", "RolloutNeeds"]
