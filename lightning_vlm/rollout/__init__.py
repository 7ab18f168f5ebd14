"""The sampling side of online RL: the rollout callback, generation engines, rewards, sample tables."""

from lightning_vlm.rollout.callback import RolloutCallback
from lightning_vlm.rollout.engines import (
    Generation,
    GenerationRequest,
    HFEngine,
    RolloutEngine,
    SamplingSettings,
)
from lightning_vlm.rollout.rollout import Rollout
from lightning_vlm.rollout.vllm_engine import VLLMEngine

__all__ = [
    "Generation",
    "GenerationRequest",
    "HFEngine",
    "Rollout",
    "RolloutCallback",
    "RolloutEngine",
    "SamplingSettings",
    "VLLMEngine",
]
