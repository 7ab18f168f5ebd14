"""Supervised fine-tuning (SFT) of a vision-language model.

Paper: standard maximum-likelihood instruction tuning, as in LLaVA (https://arxiv.org/abs/2304.08485).
The model reads the image(s) and the conversation and is trained to predict every assistant token
(token-mean negative log-likelihood); user turns, images and padding carry no loss. Held-out
quality is the exact-match accuracy of greedy answers to the last user turn. Closest sibling: the
generation term of MPO, which applies the same loss to the chosen response of a preference pair.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric

from lightning_vlm.losses import sft_loss
from lightning_vlm.metrics import exact_match
from lightning_vlm.model.backbone import BackboneConfig
from lightning_vlm.model.packing import check_packing
from lightning_vlm.objectives.base import VLMObjective
from lightning_vlm.rollout.tables import prompt_text, write_val_samples


class SFT(VLMObjective):
    """Supervised fine-tuning on chat rows with images."""

    disable_dropout = False  # dropout regularises maximum likelihood; nothing compares two forwards

    def __init__(
        self, backbone: BackboneConfig, eval_max_new_tokens: int = 16, table_rows: int = 8, **kwargs: Any
    ):
        """
        Args:
            backbone: The VLM to train.
            eval_max_new_tokens: Tokens generated per held-out answer (greedy) for ``val/accuracy``,
                ``test/accuracy`` and ``predict``.
            table_rows: Held-out rows per validation (rank 0's first) appended to ``val_samples.jsonl``
                in the run folder (images under ``samples/``) and, with the WandbLogger, logged as the
                W&B table ``val/samples``: prompt, image, generated answer, reference, exact match. 0: none.
            **kwargs: Optimisation settings of :class:`VLMObjective` (lr, schedule, optimizer, ...).
        """
        super().__init__(backbone, **kwargs)
        self.accuracy = MeanMetric()
        self.tabled: list[dict] = []  # this validation's tabled rows

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = batch["labels_mask"]  # (B, T)
        logps = self.backbone.token_logps(
            batch["input_ids"], batch["attention_mask"], batch["vision"], mask, packed=batch.get("packed", False)
        )
        return sft_loss(logps, mask)

    def setup(self, stage: str) -> None:
        if getattr(getattr(self._trainer, "datamodule", None), "hparams", {}).get("packing"):
            check_packing(self.backbone.hf_config)  # before the first step, naming the family

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss, metrics = self._loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/tokens", metrics["tokens"], reduce_fx="sum", batch_size=bs)
        return self.guard(self.token_mean_over_ranks(loss, metrics["tokens"]))

    def _answers(self, batch: dict) -> list[str]:
        p = batch["prompt"]
        ids = self.backbone.generate(
            p["input_ids"], p["attention_mask"], p["vision"], max_new_tokens=self.hparams.eval_max_new_tokens
        )
        return self.backbone.decode(ids)

    def _evaluate(self, batch: dict, stage: str) -> None:
        loss, _ = self._loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        answers = self._answers(batch)
        hits = [exact_match(a, r) for a, r in zip(answers, batch["answers"], strict=True)]
        if stage == "val":
            self._table(batch, answers, hits)
        self.accuracy.update(torch.tensor(hits, dtype=torch.float32, device=self.device))
        self.log(f"{stage}/accuracy", self.accuracy, prog_bar=True, batch_size=bs)

    def on_validation_epoch_start(self) -> None:
        # A `validate` run before `fit` leaves inference-mode tensors in the metric state.
        self.accuracy.reset()

    on_test_epoch_start = on_validation_epoch_start

    def _table(self, batch: dict, answers: list[str], hits: list[bool]) -> None:
        step, room = self.global_step, self.hparams.table_rows - len(self.tabled)
        for k, row in enumerate(batch["rows"][: max(room, 0)]):
            record = {"step": step, "row": row, "prompt": prompt_text(batch["prompts"][k]), "answer": answers[k],
                      "reference": batch["answers"][k], "accuracy": float(hits[k])}  # fmt: skip
            self.tabled.append({**record, "images": batch["images"][k]})

    def on_validation_epoch_end(self) -> None:
        records, self.tabled = self.tabled, []
        if self.hparams.table_rows:
            write_val_samples(self.trainer, records)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        answers = self._answers(batch)
        return [
            {"row": row, "completion": a, "reference": r, "exact_match": exact_match(a, r)}
            for row, a, r in zip(batch["rows"], answers, batch["answers"], strict=True)
        ]
