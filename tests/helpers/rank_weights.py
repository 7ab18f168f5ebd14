"""A callback for multi-process tests: each rank saves its trainable weights (whole tensors, FSDP2 shards
gathered) and its last ``rollout/logp_gap`` at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveRankWeights(L.Callback):
    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in pl_module.named_parameters()
            if p.requires_grad
        }
        gap = trainer.callback_metrics.get("rollout/logp_gap")
        weights["rollout/logp_gap"] = torch.as_tensor(float("nan") if gap is None else float(gap))
        torch.save(weights, self.folder / f"rank{trainer.global_rank}.pt")
