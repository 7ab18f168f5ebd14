"""Direct Preference Optimization (DPO) of a vision-language model, with the IPO and hinge variants.

Paper: Rafailov et al. 2023, https://arxiv.org/abs/2305.18290 (IPO: https://arxiv.org/abs/2310.12036;
hinge / SLiC-HF: https://arxiv.org/abs/2305.10425).
DPO trains the policy directly on preference pairs: the implicit reward of a response is
``beta * log(pi(y|x) / pi_ref(y|x))`` and the loss pushes the chosen response's reward above the
rejected one's through a sigmoid (IPO: a squared distance to ``1/(2 beta)``; hinge: a margin of 1).
Chosen and rejected share the prompt's images, which are encoded once per pair; the reference
model's log-probs come from disabled LoRA adapters, a frozen copy, or a cache computed before
training. Closest sibling: MPO, which adds a BCO quality term and an SFT term to this loss.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_vlm.losses import dpo_loss, hinge_loss, ipo_loss
from lightning_vlm.model.backbone import BackboneConfig
from lightning_vlm.objectives.preference.base import PreferenceObjective
from lightning_vlm.objectives.preference.pairs import PairLogps


class DPO(PreferenceObjective):
    """DPO / IPO / hinge on image preference pairs."""

    need_reference = True

    def __init__(
        self,
        backbone: BackboneConfig,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_ref_logps: bool = False,
        **kwargs: Any,
    ):
        """
        Args:
            backbone: The VLM to train; the reference is its initial state.
            beta: Inverse strength of the KL constraint (higher keeps the policy closer to the
                reference). IPO's target gap is ``1 / (2 beta)``.
            loss_type: ``sigmoid`` (DPO), ``ipo`` (on token-averaged log-probs, as in the IPO paper)
                or ``hinge`` (SLiC).
            label_smoothing: Assumed rate of flipped labels for ``sigmoid`` (conservative DPO).
            precompute_ref_logps: Score every training and held-out row with the reference once
                before training and cache the values (saved in checkpoints); the frozen reference copy
                is then released (full fine-tuning), and steps skip the reference forward.
            **kwargs: ``table_rows`` (the samples table), ``shared_prefix`` (see :class:`PreferenceObjective`) and the
                optimisation settings of :class:`VLMObjective` (lr, schedule, ...).
        """
        super().__init__(backbone, **kwargs)
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError("model.label_smoothing applies to loss_type 'sigmoid' only")
        self.pairs = PairLogps(self.backbone, loss_type == "ipo", self.hparams.shared_prefix)

    def on_fit_start(self) -> None:
        if self.hparams.precompute_ref_logps:
            self.pairs.precompute(self)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        (c, r), _, features = self.pairs.policy(batch)
        rc, rr = self.pairs.reference(batch, features)
        h = self.hparams
        self.pair_scores = (h.beta * (c - rc)).detach(), (h.beta * (r - rr)).detach()  # implicit rewards
        if h.loss_type == "ipo":
            return ipo_loss(c, r, rc, rr, beta=h.beta)
        if h.loss_type == "hinge":
            return hinge_loss(c, r, rc, rr, beta=h.beta)
        return dpo_loss(c, r, rc, rr, beta=h.beta, label_smoothing=h.label_smoothing)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ref_logps"] = self.pairs.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.pairs.load_state_dict(checkpoint.get("ref_logps", {}))
