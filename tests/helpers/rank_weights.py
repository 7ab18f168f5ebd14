"""A callback for multi-process tests: each rank saves its trainable weights at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveRankWeights(L.Callback):
    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(weights, self.folder / f"rank{trainer.global_rank}.pt")
