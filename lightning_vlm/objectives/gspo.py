"""Group Sequence Policy Optimization (GSPO) for vision-language models, and its GSPO-token variant.

Paper: Zheng et al. 2025, https://arxiv.org/abs/2507.18071.
Rollouts, rewards and group advantages are GRPO's. What differs is the importance ratio: GSPO uses
one ratio per sequence, the geometric mean of its token ratios
``s = exp(mean_t(log pi(y_t) - log pi_old(y_t)))``, and clips it in a very narrow band (3e-4 / 4e-4
by default); each sequence's loss is ``-min(s A, clip(s) A)`` and sequences are averaged. Token-level
ratios fluctuate wildly when a Mixture-of-Experts model routes a token to different experts after an
update; the sequence ratio averages that noise out, which is why GSPO is the stable choice for MoE
backbones (pair it with ``router_aux_coef``). The clip only acts once the policy has moved, so
GSPO wants ``mini_batches > 1`` or ``num_iterations > 1``. Closest sibling: GRPO (per-token ratios).
"""

from __future__ import annotations

from typing import Any, Literal

from lightning_vlm.backbone import BackboneConfig
from lightning_vlm.losses import gspo_loss
from lightning_vlm.objectives.base import VLMObjective
from lightning_vlm.objectives.online import OnlineRL, OnlineSteps
from lightning_vlm.rollout import Rollout


class GSPO(OnlineSteps, VLMObjective):
    """GSPO on prompts with images and verifiable (or learned) rewards; needs a RolloutCallback."""

    def __init__(
        self,
        backbone: BackboneConfig,
        beta: float = 0.0,
        eps_low: float = 3e-4,
        eps_high: float = 4e-4,
        token_level: bool = False,
        scale_rewards: Literal["group", "batch", "none"] = "group",
        num_iterations: int = 1,
        mini_batches: int = 1,
        accumulation: int = 1,
        max_grad_norm: float | None = 1.0,
        router_aux_coef: float = 0.0,
        eval_max_new_tokens: int | None = None,
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
            num_iterations: Optimisation passes over each rollout.
            mini_batches: Optimiser steps per pass (the paper splits each rollout into several).
            accumulation: Forwards per optimiser step (gradient accumulation, for memory).
            max_grad_norm: Clip the gradient norm per optimiser step (null: off).
            router_aux_coef: Weight of the MoE router load-balancing loss (MoE backbones only; 0: off).
            eval_max_new_tokens: Tokens generated per held-out prompt (greedy); default: the rollout's.
            **kwargs: Optimisation settings of :class:`VLMObjective` (lr, schedule, ...).
        """
        self.need_reference = beta > 0
        super().__init__(backbone, **kwargs)
        self.automatic_optimization = False  # several optimiser steps per rollout
        self.online = OnlineRL(self, token_norm=False)

    def policy_loss(self, logps, old_logps, advantages, mask, ref_logps, rollout: Rollout, samples=None):
        h = self.hparams
        return gspo_loss(
            logps,
            old_logps,
            advantages,
            mask,
            eps_low=h.eps_low,
            eps_high=h.eps_high,
            beta=h.beta,
            ref_logps=ref_logps,
            token_level=h.token_level,
        )
