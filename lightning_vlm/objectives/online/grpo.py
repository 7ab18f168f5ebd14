"""Group Relative Policy Optimization (GRPO) for vision-language models, with the DAPO and Dr. GRPO variants.

Paper: Shao et al. 2024 (DeepSeekMath), https://arxiv.org/abs/2402.03300; DAPO (clip-higher, token-level
normalisation, dynamic sampling, overlong shaping): https://arxiv.org/abs/2503.14476; Dr. GRPO:
https://arxiv.org/abs/2503.20783.
For each prompt the RolloutCallback samples G completions and scores them; a completion's advantage
is its reward minus its group's mean, divided by the group's std (``scale_rewards``). The policy
maximises the PPO-style clipped surrogate with a per-token importance ratio, optionally with a k3 KL
penalty to the reference, and the per-token losses are normalised by ``norm``. Closest sibling: GSPO,
which uses one length-normalised importance ratio per sequence instead of one per token.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning_vlm.losses import group_advantages, grpo_loss
from lightning_vlm.model.backbone import BackboneConfig
from lightning_vlm.objectives.online.base import Chunk, OnlineObjective, RolloutNeeds
from lightning_vlm.rollout.rollout import Rollout


class GRPO(OnlineObjective):
    """GRPO on prompts with images and verifiable (or learned) rewards; needs a RolloutCallback."""

    def __init__(
        self,
        backbone: BackboneConfig,
        beta: float = 0.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        norm: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "dapo",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        **kwargs: Any,
    ):
        """
        Args:
            backbone: The VLM to train; with ``beta > 0`` the reference is its initial state.
            beta: Weight of the k3 KL penalty to the reference (0: no reference model is kept or run).
            eps_low: Lower clip range of the token ratio.
            eps_high: Upper clip range (DAPO's clip-higher: e.g. 0.28).
            norm: Loss normalisation: ``grpo`` (token mean per sequence, then mean), ``bnpo``/``dapo``
                (mean over all tokens of the optimiser step), ``dr_grpo`` (sum / (sequences x max_new_tokens)).
            scale_rewards: Advantage scaling: by the group's std (``group``), the batch's (``batch``) or
                not at all (``none``, as Dr. GRPO recommends).
            **kwargs: ``loop`` (the shared update loop: ``OnlineSettings``) and the optimisation
                settings of :class:`VLMObjective` (lr, schedule, ...).
        """
        if scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"model.scale_rewards must be group, batch or none; got {scale_rewards!r}")
        super().__init__(backbone, **kwargs)

    def needs(self) -> RolloutNeeds:
        return RolloutNeeds(reference=self.hparams.beta > 0)

    def advantages(self, rollout: Rollout):
        scale = self.hparams.scale_rewards
        std = self.reward_std(rollout) if scale == "batch" else None  # over every rank
        return group_advantages(rollout.rewards, rollout.group_size, scale, std)[0]

    def policy_loss(self, chunk: Chunk):
        h = self.hparams
        return grpo_loss(
            chunk.logps,
            chunk.old_logps,
            chunk.advantages,
            chunk.mask,
            eps_low=h.eps_low,
            eps_high=h.eps_high,
            beta=h.beta,
            ref_logps=chunk.ref_logps,
            norm=h.norm,
            max_completion_length=chunk.rollout.max_new_tokens,
            totals=chunk.totals,
            sampler_logps=chunk.sampler_logps,
            tis_cap=chunk.tis_cap,
        )
