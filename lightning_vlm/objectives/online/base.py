"""The base of online objectives: the protocol with the rollout side, and the shared update loop.

Protocol. The :class:`~lightning_vlm.rollout.RolloutCallback` samples and scores; it hands the
objective finished rollouts through one hook, :meth:`OnlineObjective.on_rollout`, and the
objective never looks the callback up. An online objective subclasses :class:`OnlineObjective`
and fills in three hooks:

- :meth:`~OnlineObjective.needs`: which extra log-probs a rollout needs (reference, old policy)
  and the smallest group it accepts, declared in one place;
- :meth:`~OnlineObjective.advantages`: (B*G,) per-sample or (B*G, N) per-token advantages;
- :meth:`~OnlineObjective.policy_loss`: the loss of one :class:`Chunk` (a forward's worth of
  samples). It passes ``chunk.totals`` to its loss function, which divides by the step's total in
  the unit it normalises by (tokens or sequences): the loop never guesses the normaliser.

The loop (``loop: OnlineSettings``): each rollout trains ``num_iterations`` passes of
``mini_batches`` optimiser steps of ``accumulation`` forwards each (manual optimisation). A
chunk is "samples k..k' of every prompt", laid out in block order, so each forward encodes each
prompt's image once, or not at all when the image side is frozen (the rollout's features; a trained
image side reuses them only for the old-policy pass, see ``Rollout``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lightning_vlm.objectives.base import VLMObjective
from lightning_vlm.objectives.online import loop
from lightning_vlm.objectives.online.loop import Chunk
from lightning_vlm.rollout.rollout import Rollout

# Checkpoints are written after a rollout's optimiser steps, which is the state we want to save.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


@dataclass
class OnlineSettings:
    """The update loop shared by every online objective.

    Args:
        num_iterations: Optimisation passes over each rollout (PPO epochs). Old-policy log-probs
            are computed only when a rollout serves more than one optimiser step (or the objective
            needs them).
        mini_batches: Optimiser steps per pass; each takes ``num_generations / mini_batches``
            samples of every prompt.
        accumulation: Forwards per optimiser step (gradient accumulation, for memory); the update
            does not depend on it.
        max_grad_norm: Clip the gradient norm per optimiser step (null: off). Lightning's
            ``gradient_clip_val`` and ``accumulate_grad_batches`` do not apply (manual optimisation).
        router_aux_coef: Weight of the MoE router load-balancing loss (MoE backbones only; 0: off).
        tis_cap: Truncated importance sampling: the policy-gradient term is weighted by
            ``min(pi_old / pi_sampler, tis_cap)`` (per token; per sequence for GSPO), on whenever the
            engine is not the trainer itself, i.e. the rollout carries engine log-probs; null: off.
        shared_prefix: Score the samples of a prompt with one forward of the prompt (its KV cache repeated
            for the samples, gradients summed back into it) instead of one prompt + completion sequence per
            sample; same values and gradients, with or without gradient checkpointing (docs/online_rl.md).
    """

    num_iterations: int = 1
    mini_batches: int = 1
    accumulation: int = 1
    max_grad_norm: float | None = 1.0
    router_aux_coef: float = 0.0
    tis_cap: float | None = 2.0
    shared_prefix: bool = True


@dataclass(frozen=True)
class RolloutNeeds:
    """What an objective needs from each rollout (its :meth:`OnlineObjective.needs` hook).

    Args:
        reference: Reference log-probs (``rollout.ref_logps``); the backbone keeps a reference.
        old_policy: The sampling policy's log-probs (``rollout.old_logps``) even on-policy, e.g.
            for a KL-shaped reward. Off-policy steps get them regardless.
        min_group_size: Fewest samples per prompt: 2 for group-relative advantages (which also
            allows dynamic sampling), 1 with a learned baseline.
    """

    reference: bool = False
    old_policy: bool = False
    min_group_size: int = 2


class OnlineObjective(VLMObjective):
    """Base of GRPO, GSPO, RLOO and PPO; needs a RolloutCallback in ``trainer.callbacks``."""

    def __init__(self, backbone, loop: OnlineSettings | None = None, **kwargs: Any):
        """
        Args:
            backbone: The policy to train; when the objective needs a reference, it is the initial state.
            loop: The update loop shared by online objectives (see ``OnlineSettings``).
            **kwargs: Optimisation settings of :class:`VLMObjective` (lr, schedule, ...).
        """
        super().__init__(backbone, **kwargs)
        settings = loop if loop is not None else OnlineSettings()
        if isinstance(settings, dict):
            settings = OnlineSettings(**settings)
        for name in ("num_iterations", "mini_batches", "accumulation"):
            if getattr(settings, name) < 1:
                raise ValueError(f"model.loop.{name} must be at least 1, got {getattr(settings, name)}")
        if settings.tis_cap is not None and not settings.tis_cap > 0:
            raise ValueError(f"model.loop.tis_cap must be positive (null: off), got {settings.tis_cap}")
        self.settings = settings
        self.hparams["loop"] = asdict(settings)  # plain values in checkpoints (weights-only loading)
        self.automatic_optimization = False  # several optimiser steps per rollout
        self.backbone.need_reference = self.needs().reference
        self._rollouts: dict[str, list[Rollout]] = {}

    @property
    def steps_per_batch(self) -> int:
        """Optimiser steps one training batch (a rollout) makes; progress bars count batches."""
        return self.settings.num_iterations * self.settings.mini_batches

    # ------------------------------------------------------------------ hooks for subclasses
    def needs(self) -> RolloutNeeds:
        """What each rollout needs (default: nothing extra, groups of at least 2)."""
        return RolloutNeeds()

    def advantages(self, rollout: Rollout) -> torch.Tensor:
        """(B*G,) or (B*G, N) advantages; called after the rollout's old/reference log-probs are in."""
        raise NotImplementedError

    def policy_loss(self, chunk: Chunk) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, metrics)`` of one chunk, normalised by ``chunk.totals`` (see the module docstring)."""
        raise NotImplementedError

    def reward_std(self, rollout: Rollout) -> torch.Tensor:
        """Standard deviation (unbiased) of the rewards of the samples that train (``rollout.keep``) over
        every rank: the global batch's, as ``scale_rewards: batch`` divides by."""
        keep = rollout.keep.to(rollout.rewards.dtype)
        r = rollout.rewards * keep
        sums = torch.stack([keep.sum(), r.sum(), (r * r).sum()])
        if self._trainer is not None and self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        n, s1, s2 = sums
        return ((s2 - s1 * s1 / n.clamp(min=1)) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()

    # ------------------------------------------------------------------ the rollout hand-over
    def on_rollout(self, rollouts: list[Rollout], stage: str) -> None:
        """Receive a step's finished rollouts from the rollout side (``stage`` ``train``) or a held-out
        batch's (``val``/``test``/``predict``: a greedy rollout, then a sampled one if the callback's
        ``eval_sampling`` is on). Training rollouts get their old/reference log-probs and advantages here."""
        if stage == "train":
            self._check(rollouts[0])
            needs = self.needs()
            old = needs.old_policy or self.settings.num_iterations * self.settings.mini_batches > 1
            for r in rollouts:
                if old:
                    r.old_logps = loop.logps(self, r)
                if needs.reference:
                    with self.backbone.reference() as ref:
                        r.ref_logps = loop.logps(self, r, model=ref)
                r.advantages = self.advantages(r)
        self._rollouts[stage] = rollouts

    def _check(self, rollout: Rollout) -> None:
        G, s, least = rollout.group_size, self.settings, self.needs().min_group_size
        name = type(self).__name__
        if G < least:
            raise ValueError(
                f"rollout.num_generations must be at least {least} for {name}, got {G}"
                + (" (advantages compare the samples of a group)" if least > 1 else "")
            )
        if G % (s.mini_batches * s.accumulation):
            raise ValueError(
                f"rollout.num_generations ({G}) must be divisible by model.loop.mini_batches x "
                f"model.loop.accumulation ({s.mini_batches} x {s.accumulation}): each forward takes the "
                "same samples of every prompt"
            )
        if rollout.dynamic_sampling and least < 2:
            raise ValueError(
                "rollout.dynamic_sampling drops groups of equal rewards, which carry no signal only for "
                f"group-relative advantages: {name} learns from every sample"
            )

    def _take(self, stage: str) -> list[Rollout]:
        if stage not in self._rollouts:
            raise RuntimeError(
                f"{type(self).__name__} got no rollout for this {stage} batch: online objectives need a "
                "lightning_vlm.rollout.RolloutCallback in trainer.callbacks (see zoo/tiny_qwen2vl_gspo.yaml)"
            )
        return self._rollouts.pop(stage)

    # ------------------------------------------------------------------ Lightning steps
    def training_step(self, batch: dict, batch_idx: int) -> None:
        loop.train(self, self._take("train"))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._held_out(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._held_out(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        r = self._take("predict")[0]
        return [
            {"row": row, "completion": t, "reward": float(r.rewards[i])}
            | {k: _value(v[i]) for k, v in r.rewards_per_function.items()}
            for i, (row, t) in enumerate(zip(batch["rows"], r.texts, strict=True))
        ]

    def _held_out(self, batch: dict, stage: str) -> list[Rollout]:
        """Log the greedy answers' ``<stage>/reward`` and ``<stage>/rewards/<function>``. Every rank
        logs every key (a rank where a function applied to no answer adds weight 0), so the ranks'
        reductions always match. With the callback's ``eval_sampling``, also the mean reward of the
        seeded held-out samples (``<stage>/score``) and, when there is a reference, their KL to it
        (``<stage>/kl``: the sequence's summed k1, an unbiased estimate of KL(policy || reference))."""
        rollouts = self._take(stage)
        greedy = rollouts[0]
        n = len(greedy.texts)
        self.log(
            f"{stage}/reward",
            greedy.rewards.mean(),
            on_epoch=True,
            batch_size=n,
            sync_dist=True,
            prog_bar=True,
        )
        for name, values in greedy.rewards_per_function.items():
            ok = values[~values.isnan()]
            self.log(
                f"{stage}/rewards/{name}",
                ok.sum() / len(ok) if len(ok) else values.new_zeros(()),
                on_epoch=True,
                batch_size=len(ok),
                sync_dist=True,
                prog_bar=name == "accuracy",
            )
        if len(rollouts) > 1:
            self._sampled(rollouts[1], stage)
        return rollouts

    @torch.no_grad()
    def _sampled(self, r: Rollout, stage: str) -> None:
        n = r.rewards.numel()
        self.log(f"{stage}/score", r.rewards.mean(), on_epoch=True, batch_size=n, sync_dist=True)
        if self.needs().reference:
            logps = loop.logps(self, r)
            with self.backbone.reference() as ref:
                ref_logps = loop.logps(self, r, model=ref)
            kl = ((logps - ref_logps) * r.completion_mask).sum(-1).mean()
            self.log(f"{stage}/kl", kl, on_epoch=True, batch_size=n, sync_dist=True, prog_bar=True)


def _value(v: torch.Tensor) -> float | None:
    return None if v.isnan() else float(v)
