"""The base of the offline preference objectives (DPO, MPO, the reward model). Each ``_loss`` keeps its
pairs' (chosen, rejected) scores in ``pair_scores`` (implicit rewards ``beta * (logp - ref_logp)``, or the
reward model's scores); the base turns them into ``predict`` rows and each validation's samples table."""

from __future__ import annotations

from typing import Any

import torch

from lightning_vlm.model.backbone import BackboneConfig
from lightning_vlm.objectives.base import VLMObjective
from lightning_vlm.rollout.tables import prompt_text, write_val_samples


class PreferenceObjective(VLMObjective):
    """Base of DPO, MPO and RewardModel."""

    score_names = ("reward_chosen", "reward_rejected")  # what ``pair_scores`` holds, as columns

    def __init__(
        self, backbone: BackboneConfig, table_rows: int = 8, shared_prefix: bool = True, **kwargs: Any
    ):
        """
        Args:
            backbone: The VLM to train.
            table_rows: Held-out pairs per validation (rank 0's first) appended to ``val_samples.jsonl``
                in the run folder (images under ``samples/``) and, with the WandbLogger, logged as the
                W&B table ``val/samples``: prompt, image, chosen, rejected, their scores and margin. 0: none.
            shared_prefix: Run each pair's prompt (with its images) once, with gradient, and the chosen and
                rejected responses on its KV cache (``lightning_vlm.model.prefix``): the same values and
                gradients as two full sequences. Needs the datamodule's ``vision_once``; where it does not
                apply, pairs are scored per sequence and the logs say why, once.
            **kwargs: Optimisation settings of :class:`VLMObjective` (lr, schedule, ...).
        """
        super().__init__(backbone, **kwargs)
        self.pair_scores: tuple[torch.Tensor, torch.Tensor] | None = None  # (B,), (B,): set by _loss
        self.tabled: list[dict] = []  # this validation's tabled pairs

    def _scored(self, batch: dict, stage: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (chosen, rejected) scores that ``_loss`` kept for ``batch`` (its metrics logged under ``stage``)."""
        self.pair_scores = None  # never a previous batch's
        self._step(batch, stage) if stage else self._loss(batch)
        if self.pair_scores is None:
            raise NotImplementedError(f"{type(self).__name__}._loss did not set pair_scores")
        return self.pair_scores

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        (chosen, rejected), names = self._scored(batch), self.score_names
        return [
            {"row": row, names[0]: float(a), names[1]: float(b)}
            for row, a, b in zip(batch["rows"], chosen, rejected, strict=True)
        ]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        (chosen, rejected), names = self._scored(batch, "val"), self.score_names
        room = self.hparams.table_rows - len(self.tabled)
        for k, row in enumerate(batch["rows"][: max(room, 0)]):
            record = {"step": self.global_step, "row": row, "prompt": prompt_text(batch["prompts"][k])}
            record.update({key: prompt_text(batch[key][k]) for key in ("chosen", "rejected")})
            c, r = float(chosen[k]), float(rejected[k])
            record.update({names[0]: c, names[1]: r, "margin": c - r, "images": batch["images"][k]})
            self.tabled.append(record)

    def on_validation_epoch_end(self) -> None:
        records, self.tabled = self.tabled, []
        if self.hparams.table_rows:
            write_val_samples(self.trainer, records)
