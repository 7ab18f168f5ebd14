"""Group Sequence Policy Optimization (GSPO) for vision-language models, and its GSPO-token variant.

Paper: Zheng et al. 2025, https://arxiv.org/abs/2507.18071.
Rollouts, rewards and group advantages are GRPO's. What differs is the importance ratio: GSPO uses
one ratio per sequence, the geometric mean of its token ratios
``s = exp(mean_t(log pi(y_t) - log pi_old(y_t)))``, and clips it in a very narrow band (3e-4 / 4e-4
by default); each sequence's loss is ``-min(s A, clip(s) A)`` and sequences are averaged. Token-level
ratios fluctuate wildly when a Mixture-of-Experts model routes a token to different experts after an
update; the sequence ratio averages that noise out, which is why GSPO is the stable choice for MoE
backbones (pair it with ``loop.router_aux_coef``). The clip only acts once the policy has moved, so
GSPO wants ``loop.mini_batches > 1`` or ``loop.num_iterations > 1``. Closest sibling: GRPO (per-token ratios).
"""

from __future__ import annotations

from typing import Any, Literal

from lightning_vlm.losses import group_advantages, gspo_loss
from lightning_vlm.model.backbone import BackboneConfig
from lightning_vlm.objectives.online.base import Chunk, OnlineObjective, RolloutNeeds
from lightning_vlm.rollout.rollout import Rollout


class GSPO(OnlineObjective):
    """GSPO on prompts with images and verifiable (or learned) rewards; needs a RolloutCallback."""

    def __init__(
        self,
        backbone: BackboneConfig,
        beta: float = 0.0,
        eps_low: float = 3e-4,
        eps_high: float = 4e-4,
        token_level: bool = False,
        scale_rewards: Literal["group", "batch", "none"] = "group",
        **kwargs: Any,
    ):
        """
        Args:
            backbone: The VLM to train; with ``beta > 0`` the reference is its initial state.
            beta: Weight of the KL penalty (token-mean k3 per sequence) to the reference; 0 in the paper.
            eps_low: Lower clip range of the sequence ratio (paper: 3e-4).
            eps_high: Upper clip range of the sequence ratio (paper: 4e-4).
            token_level: GSPO-token: the same ratio values, with the gradient reaching each token
                through its own log-prob (allows per-token advantages).
            scale_rewards: Advantage scaling: ``group`` std, ``batch`` std or ``none``.
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
        return gspo_loss(
            chunk.logps,
            chunk.old_logps,
            chunk.advantages,
            chunk.mask,
            eps_low=h.eps_low,
            eps_high=h.eps_high,
            beta=h.beta,
            ref_logps=chunk.ref_logps,
            token_level=h.token_level,
            totals=chunk.totals,
            sampler_logps=chunk.sampler_logps,
            tis_cap=chunk.tis_cap,
        )
