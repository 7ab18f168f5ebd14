"""Sample tables of a rollout: what the policy wrote, beside its images, its rewards and advantages."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning_vlm.rollout.rollout import Rollout


def write_samples(trainer, run_folder: Path, rollout: Rollout, batch: dict, rows: int) -> None:
    """Append ``rows`` of the rollout's samples to ``samples.jsonl`` in ``run_folder`` (images saved under
    ``samples/``) and, with the WandbLogger, log them as the W&B table ``rollout/samples``. Rank 0 only:
    the caller resolves ``trainer.log_dir``, a collective, on every rank."""
    folder = run_folder / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    step = trainer.global_step
    records, images = [], []
    for s in range(min(rows, len(rollout.texts))):
        i = s // rollout.group_size
        paths = []
        for j, image in enumerate(batch["images"][i]):
            path = folder / f"step{step}_prompt{i}_{j}.png"
            if not path.exists():
                image.save(path)
            paths.append(str(path))
        record = {
            "step": step,
            "sample": s,
            "prompt": _prompt_text(batch["prompts"][i]),
            "completion": rollout.texts[s],
            "reward": float(rollout.rewards[s]),
            "advantage": _advantage(rollout, s),
            **{k: _finite(v[s]) for k, v in rollout.rewards_per_function.items()},
            "images": paths,
        }
        records.append(record)
        images.append(batch["images"][i])
    with (folder.parent / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            columns = [k for k in records[0] if k != "images"] + ["image"]
            data = [
                [rec[k] for k in columns[:-1]] + [wandb.Image(ims[0]) if ims else None]
                for rec, ims in zip(records, images, strict=True)
            ]
            # No explicit step: W&B steps must increase, and Lightning logs by batches, not optimiser steps.
            logger.log_table(key="rollout/samples", columns=columns, data=data)


def _advantage(rollout: Rollout, s: int) -> float | None:
    """Sample s's advantage; for per-token advantages (PPO) their mean over the completion."""
    a = rollout.advantages
    if a is None:
        return None
    if a.dim() == 1:
        return float(a[s])
    m = rollout.completion_mask[s].float()
    return float((a[s] * m).sum() / m.sum().clamp(min=1.0))


def _finite(value: torch.Tensor) -> float | None:
    v = float(value)
    return None if math.isnan(v) else v


def _prompt_text(messages: Any) -> str:
    if isinstance(messages, str):
        return messages
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
