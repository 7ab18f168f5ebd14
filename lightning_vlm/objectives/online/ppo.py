"""Proximal Policy Optimization (PPO) against a learned vision-language reward model: classic RLHF.

Papers: Schulman et al. 2017 (PPO), https://arxiv.org/abs/1707.06347; Ouyang et al. 2022 (InstructGPT:
SFT, reward model, PPO with a KL-shaped reward), https://arxiv.org/abs/2203.02155; Huang et al. 2024,
"The N+ Implementation Details of RLHF with PPO", https://arxiv.org/abs/2403.17031.
The RolloutCallback samples completions and scores them, usually with a trained reward model
(``RewardModelReward``). Every completion token is rewarded ``-kl_coef * KL_t`` to the reference and
the last one also gets the score; a critic, initialised from the reward model, predicts each token's
return, GAE turns rewards and values into whitened per-token advantages, and the policy (clipped
surrogate) and the critic (clipped regression on the returns) train for several epochs per rollout.
Closest sibling: GRPO, which has no critic: it compares G samples of the same prompt, gives every
token of a sample the same advantage, and puts the KL in the loss instead of the reward.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import torch

from lightning_vlm.losses import explained_variance, gae, kl_penalty_rewards, masked_whiten, ppo_losses
from lightning_vlm.model.config import BackboneConfig, as_backbone_config
from lightning_vlm.model.vision import has_images
from lightning_vlm.objectives.online import loop
from lightning_vlm.objectives.online.base import Chunk, OnlineObjective, RolloutNeeds
from lightning_vlm.objectives.preference.reward_model import Critic, check_compatible
from lightning_vlm.rollout.rollout import Rollout


class PPO(OnlineObjective):
    """PPO with a critic on prompts with images; rewards from a RolloutCallback (a reward model)."""

    def __init__(
        self,
        backbone: BackboneConfig,
        critic: BackboneConfig,
        critic_lr: float | None = None,
        kl_coef: float = 0.05,
        kl: Literal["k1", "k3"] = "k1",
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        whiten_advantages: bool = True,
        missing_eos_penalty: float | None = None,
        critic_warmup_rollouts: int = 0,
        **kwargs: Any,
    ):
        """
        Args:
            backbone: The policy (usually the SFT model); with ``kl_coef > 0`` the reference is its
                initial state.
            critic: The value model: ``model_name_or_path`` is a RewardModel export (its weights and
                ``reward_head`` start the critic); ``lora``, ``vision``, ``dtype`` and
                ``gradient_checkpointing`` apply to it as to the policy. It must share the policy's
                tokenizer and model family.
            critic_lr: Learning rate of the critic (default AdamW only; null: ``lr``).
            kl_coef: Weight of the per-token KL penalty in the reward (0: no reference is kept or run).
            kl: KL estimator per token: ``k1`` (``logp - ref``) or ``k3`` (non-negative, lower variance).
            kl_target: Adapt the KL coefficient towards this sequence KL (Ziegler et al. 2019's
                controller; ``kl_coef`` is then the starting value). Null: a fixed ``kl_coef``.
            kl_horizon: The controller's horizon in samples: a rollout of n samples whose KL is off
                target by a factor e (clipped to +-0.2) scales the coefficient by ``1 + e * n / horizon``.
            gamma: Discount of GAE.
            lam: GAE's lambda (1: Monte-Carlo returns; 0: one-step temporal difference).
            cliprange: Clip range of the policy's importance ratio.
            cliprange_value: Clip range of the value predictions around the rollout's values.
            vf_coef: Weight of the value loss.
            whiten_advantages: Whiten the advantages over the rollout's tokens (mean 0, std 1).
            missing_eos_penalty: Subtract this from the score of completions cut at ``max_new_tokens``
                without EOS (null: off).
            critic_warmup_rollouts: The first N rollouts train the critic only (the policy's forwards
                run without gradient), so its values fit the returns before they steer the policy
                (OpenRLHF's ``freezing_actor_steps``).
            **kwargs: ``loop`` (the shared update loop, ``OnlineSettings``; PPO epochs are its
                ``num_iterations``, 4 in the recipes) and the optimisation settings of :class:`VLMObjective`.
        """
        super().__init__(backbone, **kwargs)
        if kl not in ("k1", "k3"):
            raise ValueError(f"model.kl must be k1 or k3; got {kl!r}")
        if kl_target is not None and (kl_target <= 0 or kl_coef <= 0):
            raise ValueError("model.kl_target needs kl_target > 0 and a starting kl_coef > 0")
        self.kl_coef = kl_coef  # the current coefficient (adapted when kl_target is set; checkpointed)
        critic = as_backbone_config(critic)
        self.hparams["critic"] = asdict(critic)  # plain values in checkpoints (weights-only loading)
        self.critic = Critic(critic)
        check_compatible(self.backbone, self.critic.backbone)

    def needs(self) -> RolloutNeeds:
        # The KL reward is taken under the sampling policy; the critic is the baseline, so one
        # sample per prompt suffices.
        return RolloutNeeds(reference=self.hparams.kl_coef > 0, old_policy=True, min_group_size=1)

    def load_models(self) -> None:
        super().load_models()
        self.critic.load()

    def on_fit_start(self) -> None:
        kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)  # DDPStrategy's
        if (
            self.hparams.critic_warmup_rollouts
            and kwargs is not None
            and not kwargs.get("find_unused_parameters")
        ):
            raise ValueError(
                "model.critic_warmup_rollouts leaves the policy without gradients, which DDP refuses unless "
                "trainer.strategy.init_args.find_unused_parameters is true"
            )

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.hparams.critic_lr
        groups = super().param_groups()
        if lr is None:
            return groups
        critic = {id(p) for p in self.critic.parameters()}
        split = []
        for group in groups:
            for is_critic in (False, True):
                params = [p for p in group["params"] if (id(p) in critic) == is_critic]
                if params:
                    split.append({**group, "params": params, **({"lr": lr} if is_critic else {})})
        return split

    # ------------------------------------------------------------------ rollout side
    def values(self, rollout: Rollout, samples: list[int]) -> torch.Tensor:
        """(R, N) critic values for ``samples`` of every prompt (block order, see ``Rollout.rows_of``)."""
        if "critic_features" not in rollout.extra:  # the critic's own image features, once per rollout
            cb = self.critic.backbone
            frozen = has_images(rollout.vision) and cb.vision_is_frozen
            with torch.no_grad():
                rollout.extra["critic_features"] = cb.encode_images(rollout.vision) if frozen else None
        shared = loop.shared_prefix(self, len(samples), self.critic.backbone)
        return self.critic.values(rollout.sequences(samples), rollout.extra["critic_features"], shared)

    @torch.no_grad()
    def advantages(self, rollout: Rollout) -> torch.Tensor:
        """(B*G, N) whitened GAE advantages of the KL-shaped rewards; keeps the rollout's values and
        returns in ``rollout.extra`` and logs the ``objective/*`` metrics."""
        h, r = self.hparams, rollout
        mask = r.completion_mask.float() * r.keep[:, None]  # (B*G, N); no dropped samples in the whitening
        values = torch.zeros_like(mask)
        for step in loop.chunks(self, r.group_size):
            for samples in step:
                values[r.rows_of(samples)] = self.values(r, samples)
        values = values * mask
        scores = r.rewards
        if h.missing_eos_penalty is not None:
            scores = scores - h.missing_eos_penalty * r.truncated.float()
        assert r.old_logps is not None  # needs().old_policy
        ref = r.ref_logps if r.ref_logps is not None else r.old_logps  # kl_coef 0: no KL term
        rewards, kl_metrics = kl_penalty_rewards(scores, r.old_logps, ref, mask, self.kl_coef, h.kl)
        advantages, returns = gae(rewards, values, mask, h.gamma, h.lam)
        if h.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        warmup = h.critic_warmup_rollouts
        r.policy_frozen = warmup > 0 and r.index < warmup
        r.extra.update(values=values, returns=returns)
        metrics = {f"objective/{k}": v for k, v in kl_metrics.items()}
        metrics["objective/rlhf_reward"] = metrics["objective/scores"] + metrics["objective/non_score_reward"]
        metrics["value/explained_variance"] = explained_variance(values, returns, mask)
        metrics["objective/kl_coef"] = torch.tensor(self.kl_coef)
        if h.kl_target is not None:
            self._adapt_kl_coef(kl_metrics["kl"], int(r.keep.sum()))
        for key, value in metrics.items():
            self.log(key, value, on_step=True, batch_size=r.num_prompts)
        return advantages

    def _adapt_kl_coef(self, kl: torch.Tensor, samples: int) -> None:
        """Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593), section 2.2: a proportional controller
        on ``KL / target - 1``, clipped to +-0.2; the rollout's KL is averaged over ranks first."""
        h = self.hparams
        if self._trainer is not None and self.trainer.world_size > 1:
            kl = self.trainer.strategy.reduce(kl, reduce_op="mean")
            samples *= self.trainer.world_size
        error = min(max(float(kl) / h.kl_target - 1, -0.2), 0.2)
        self.kl_coef *= 1 + error * samples / h.kl_horizon

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_coef"] = self.kl_coef

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl_coef = checkpoint.get("kl_coef", self.hparams.kl_coef)

    # ------------------------------------------------------------------ update
    def policy_loss(self, chunk: Chunk):
        h, r, rows = self.hparams, chunk.rollout, chunk.rows
        return ppo_losses(
            chunk.logps,
            chunk.old_logps,
            chunk.advantages,
            self.values(r, chunk.samples),
            r.extra["values"][rows],
            r.extra["returns"][rows],
            chunk.mask,
            cliprange=h.cliprange,
            cliprange_value=h.cliprange_value,
            vf_coef=h.vf_coef,
            totals=chunk.totals,
            sampler_logps=chunk.sampler_logps,
            tis_cap=chunk.tis_cap,
        )
