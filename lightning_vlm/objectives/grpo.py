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

from lightning_vlm.backbone import BackboneConfig
from lightning_vlm.losses import grpo_loss
from lightning_vlm.objectives.base import VLMObjective
from lightning_vlm.objectives.online import OnlineRL, OnlineSteps
from lightning_vlm.rollout import Rollout


class GRPO(OnlineSteps, VLMObjective):
    """GRPO on prompts with images and verifiable (or learned) rewards; needs a RolloutCallback."""

    def __init__(
        self,
        backbone: BackboneConfig,
        beta: float = 0.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        norm: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "dapo",
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
            beta: Weight of the k3 KL penalty to the reference (0: no reference model is kept or run).
            eps_low: Lower clip range of the token ratio.
            eps_high: Upper clip range (DAPO's clip-higher: e.g. 0.28).
            norm: Loss normalisation: ``grpo`` (token mean per sequence, then mean), ``bnpo``/``dapo``
                (mean over all tokens of the optimiser step), ``dr_grpo`` (sum / (sequences x max_new_tokens)).
            scale_rewards: Advantage scaling: by the group's std (``group``), the batch's (``batch``) or
                not at all (``none``, as Dr. GRPO recommends).
            num_iterations: Optimisation passes over each rollout (old-policy log-probs are computed
                only when a rollout is used for more than one optimiser step).
            mini_batches: Optimiser steps per pass; each takes ``num_generations / mini_batches`` samples
                of every prompt.
            accumulation: Forwards per optimiser step (gradient accumulation, for memory); the update does
                not depend on it.
            max_grad_norm: Clip the gradient norm per optimiser step (null: off). Lightning's
                ``gradient_clip_val`` and ``accumulate_grad_batches`` do not apply (manual optimisation).
            router_aux_coef: Weight of the MoE router load-balancing loss (MoE backbones only; 0: off).
            eval_max_new_tokens: Tokens generated per held-out prompt (greedy); default: the rollout's.
            **kwargs: Optimisation settings of :class:`VLMObjective` (lr, schedule, ...).
        """
        self.need_reference = beta > 0
        super().__init__(backbone, **kwargs)
        self.automatic_optimization = False  # several optimiser steps per rollout
        self.online = OnlineRL(self, token_norm=norm in ("bnpo", "dapo"))

    def policy_loss(self, logps, old_logps, advantages, mask, ref_logps, rollout: Rollout, samples=None):
        h = self.hparams
        return grpo_loss(
            logps,
            old_logps,
            advantages,
            mask,
            eps_low=h.eps_low,
            eps_high=h.eps_high,
            beta=h.beta,
            ref_logps=ref_logps,
            norm=h.norm,
            max_completion_length=rollout.max_new_tokens,
        )
