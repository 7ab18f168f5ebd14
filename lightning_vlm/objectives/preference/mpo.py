"""Mixed Preference Optimization (MPO) of a vision-language model, as in InternVL2.5-MPO.

Paper: Wang et al. 2024, https://arxiv.org/abs/2411.10442 (the BCO quality term: Jung et al. 2024,
https://arxiv.org/abs/2404.04656).
MPO trains on preference pairs with a weighted sum of three terms: the DPO sigmoid loss (which
response is better), the BCO pair loss (is each response good on its own, judged against a reward
shift delta), and the SFT loss on the chosen response (how to write it). Delta is the running mean
of the batch-mean implicit reward, updated once per optimisation step from the step's
micro-batches (and ranks), used from the next step on, and saved in checkpoints, as in the paper
(recent TRL releases dropped the running delta). Closest sibling: DPO, which is MPO with weights
(1, 0, 0).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_vlm.losses import bco_pair_loss, dpo_loss, sft_loss
from lightning_vlm.model.backbone import BackboneConfig
from lightning_vlm.objectives.preference.base import PreferenceObjective
from lightning_vlm.objectives.preference.pairs import PairLogps


class MPO(PreferenceObjective):
    """DPO + BCO + SFT, weighted, on image preference pairs."""

    need_reference = True

    def __init__(
        self,
        backbone: BackboneConfig,
        beta: float = 0.1,
        preference_weight: float = 0.8,
        quality_weight: float = 0.2,
        generation_weight: float = 1.0,
        precompute_ref_logps: bool = False,
        **kwargs: Any,
    ):
        """
        Args:
            backbone: The VLM to train; the reference is its initial state.
            beta: Inverse strength of the KL constraint, shared by the DPO and BCO terms.
            preference_weight: Weight of the DPO sigmoid term (0 turns it off).
            quality_weight: Weight of the BCO pair term (0 turns it off).
            generation_weight: Weight of the SFT term on the chosen response (0 turns it off).
            precompute_ref_logps: Cache the reference log-probs of every row before training (see DPO).
            **kwargs: ``table_rows``, ``shared_prefix`` (see :class:`PreferenceObjective`) and the optimisation settings of
                :class:`VLMObjective` (lr, schedule, ...).
        """
        super().__init__(backbone, **kwargs)
        if preference_weight == quality_weight == generation_weight == 0:
            raise ValueError("model: at least one of the MPO weights must be non-zero")
        self.pairs = PairLogps(self.backbone, shared_prefix=self.hparams.shared_prefix)
        self.delta_sum, self.delta_count = 0.0, 0  # delta = delta_sum / delta_count
        self._step_rewards: list[torch.Tensor] = []  # batch-mean rewards of this step's micro-batches

    @property
    def delta(self) -> float:
        return self.delta_sum / self.delta_count if self.delta_count else 0.0

    def on_fit_start(self) -> None:
        if self.hparams.precompute_ref_logps:
            self.pairs.precompute(self)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        h = self.hparams
        (c, r), (token_logps, scored), features = self.pairs.policy(batch)
        rc, rr = self.pairs.reference(batch, features)
        self.pair_scores = (h.beta * (c - rc)).detach(), (h.beta * (r - rr)).detach()  # implicit rewards
        preference, metrics = dpo_loss(c, r, rc, rr, beta=h.beta)
        quality, bco_metrics = bco_pair_loss(c, r, rc, rr, beta=h.beta, delta=self.delta)
        n = len(batch["rows"])
        generation, gen = sft_loss(token_logps[:n], scored[:n])  # the chosen block
        terms = {
            "loss/preference": h.preference_weight * preference,
            "loss/quality": h.quality_weight * quality,
            "loss/generation": h.generation_weight * generation,
        }
        metrics.update({k: v.detach() for k, v in terms.items()})  # this rank's values
        # What trains: the generation term as a token mean over every rank's chosen responses, as SFT's.
        generation = self.token_mean_over_ranks(generation, gen["tokens"])
        loss = terms["loss/preference"] + terms["loss/quality"] + h.generation_weight * generation
        metrics["rewards/batch_mean"] = bco_metrics["rewards/batch_mean"]
        metrics["delta"] = torch.tensor(self.delta, device=c.device)
        return loss, metrics

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss, metrics = self._step(batch, "train")
        loss = self.guard(loss)
        if loss is not None:
            self._step_rewards.append(metrics["rewards/batch_mean"])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Once per optimisation step: fold the step's mean reward (all micro-batches, all ranks) in.
        if not self._step_rewards:
            return
        step_mean = torch.stack(self._step_rewards).mean()
        step_mean = self.trainer.strategy.reduce(step_mean, reduce_op="mean")
        self.delta_sum += float(step_mean)
        self.delta_count += 1
        self._step_rewards.clear()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["mpo_delta"] = {"sum": self.delta_sum, "count": self.delta_count}
        checkpoint["ref_logps"] = self.pairs.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("mpo_delta", {"sum": 0.0, "count": 0})
        self.delta_sum, self.delta_count = float(state["sum"]), int(state["count"])
        self.pairs.load_state_dict(checkpoint.get("ref_logps", {}))
