"""REINFORCE Leave-One-Out (RLOO) for vision-language models.

Paper: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs", https://arxiv.org/abs/2402.14740 (the baseline: Kool et al. 2019).
Each of a prompt's G samples is baselined by the mean reward of the other G - 1,
``A_i = r_i - mean_{j != i} r_j``, with no division by a standard deviation. With ``beta > 0`` the KL
to the reference enters the reward, per sequence (k1 summed over the completion, under the sampling
policy), before the baseline. The whole completion is one action: its advantage multiplies every
token's (clipped) ratio, summed over the completion (``norm``). Closest sibling: GRPO, whose baseline
is the group mean including the sample itself, scaled by the group's std, with the KL in the loss.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning_vlm.losses import grpo_loss, rloo_advantages
from lightning_vlm.model.config import BackboneConfig
from lightning_vlm.objectives.online.base import Chunk, OnlineObjective, RolloutNeeds
from lightning_vlm.rollout.rollout import Rollout


class RLOO(OnlineObjective):
    """RLOO on prompts with images and verifiable (or learned) rewards; needs a RolloutCallback."""

    def __init__(
        self,
        backbone: BackboneConfig,
        beta: float = 0.0,
        eps: float = 0.2,
        norm: Literal["dr_grpo", "grpo", "dapo"] = "dr_grpo",
        **kwargs: Any,
    ):
        """
        Args:
            backbone: The VLM to train; with ``beta > 0`` the reference is its initial state.
            beta: Weight of the sequence KL to the reference, subtracted from the reward (0: no
                reference is kept or run).
            eps: Clip range of the token ratio (on-policy, the ratio is 1 and the loss is REINFORCE).
            norm: ``dr_grpo``: sum over each completion's tokens, divided by sequences x
                ``max_new_tokens`` (REINFORCE's sequence sum up to a constant); ``grpo``: token mean per
                completion; ``dapo``: mean over all tokens.
            **kwargs: ``loop`` (``OnlineSettings``) and the optimisation settings of :class:`VLMObjective`.
        """
        super().__init__(backbone, **kwargs)

    def needs(self) -> RolloutNeeds:
        kl = self.hparams.beta > 0
        return RolloutNeeds(reference=kl, old_policy=kl)  # the KL reward is taken under the sampler

    def advantages(self, rollout: Rollout):
        rewards = rollout.rewards
        if self.hparams.beta > 0:
            assert rollout.old_logps is not None and rollout.ref_logps is not None  # needs()
            kl = ((rollout.old_logps - rollout.ref_logps) * rollout.completion_mask).sum(-1)  # (B*G,)
            rewards = rewards - self.hparams.beta * kl
            self.log("train/kl", kl.mean(), on_step=True, batch_size=rollout.num_prompts)
        return rloo_advantages(rewards, rollout.group_size)[0]

    def policy_loss(self, chunk: Chunk):
        h = self.hparams
        return grpo_loss(
            chunk.logps,
            chunk.old_logps,
            chunk.advantages,
            chunk.mask,
            eps_low=h.eps,
            eps_high=h.eps,
            norm=h.norm,
            max_completion_length=chunk.rollout.max_new_tokens,
            totals=chunk.totals,
            sampler_logps=chunk.sampler_logps,
            tis_cap=chunk.tis_cap,
        )
