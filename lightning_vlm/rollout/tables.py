"""Sample tables: what the policy wrote beside its images, and its rewards and advantages (a rollout), the
reference answer (SFT validation) or the pair's scores (preference validation), in a JSON lines file in the
run folder and as a W&B table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest.mock import patch

import torch

if TYPE_CHECKING:
    from lightning_vlm.rollout.rollout import Rollout


def write_samples(trainer, run_folder: Path, rollout: Rollout, batch: dict, rows: int) -> None:
    """Append ``rows`` of the rollout's samples to ``samples.jsonl`` in ``run_folder`` (images saved under
    ``samples/``) and, with the WandbLogger, log them as the W&B table ``rollout/samples``. Rank 0 only:
    the caller resolves ``trainer.log_dir``, a collective, on every rank."""
    step, records = trainer.global_step, []
    for s in range(min(rows, len(rollout.texts))):
        i = s // rollout.group_size
        record = {
            "step": step,
            "sample": s,
            "prompt": prompt_text(batch["prompts"][i]),
            "completion": rollout.texts[s],
            "reward": float(rollout.rewards[s]),
            "advantage": _advantage(rollout, s),
            **{k: _finite(v[s]) for k, v in rollout.rewards_per_function.items()},
            "images": save_images(run_folder, batch["images"][i], f"step{step}_prompt{i}"),
        }
        records.append(record)
    write_table(trainer, run_folder / "samples.jsonl", "rollout/samples", records)


def write_val_samples(trainer, records: list[dict]) -> None:
    """Append a validation's ``records`` (each with its ``step``, ``row`` and opened ``images``) to
    ``val_samples.jsonl`` in the run folder (``trainer.log_dir``, else ``default_root_dir``; images under
    ``samples/``) and, with the WandbLogger, log them as the W&B table ``val/samples``; not for the sanity
    check. Call it on every rank (``trainer.log_dir`` is a collective): rank 0 writes."""
    if trainer.sanity_checking:
        return
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    if trainer.is_global_zero:
        for rec in records:
            rec["images"] = save_images(folder, rec["images"], f"val_step{rec['step']}_row{rec['row']}")
        write_table(trainer, folder / "val_samples.jsonl", "val/samples", records)


def save_images(run_folder: Path, images: list, stem: str) -> list[str]:
    """Save ``images`` as ``samples/<stem>_<j>.png`` in ``run_folder`` (once); return their paths."""
    folder = run_folder / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}_{j}.png" for j in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        if not path.exists():
            image.save(path)
    return [str(path) for path in paths]


def write_table(trainer, jsonl: Path, key: str, records: list[dict]) -> None:
    """Append ``records`` (each with its ``images``' paths) to ``jsonl`` and, with the WandbLogger, log them
    as the W&B table ``key``, each row with its first image. W&B copies a table's images into its staging
    folder (``$WANDB_DATA_DIR``, by default ``~/.local/share/wandb``) until they are uploaded: here that is
    ``wandb/`` in the run folder, so an offline run's table images stay with the run."""
    if not records:
        return
    with jsonl.open("a") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            columns = [k for k in records[0] if k != "images"] + ["image"]
            data = [
                [rec[k] for k in columns[:-1]] + [wandb.Image(rec["images"][0]) if rec["images"] else None]
                for rec in records
            ]
            # No explicit step: W&B steps must increase, and Lightning logs by batches, not optimiser steps.
            with patch.dict(os.environ, {"WANDB_DATA_DIR": str(jsonl.parent.resolve() / "wandb")}):
                logger.log_table(key=key, columns=columns, data=data)


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


def prompt_text(messages: Any) -> str:
    """The text of the prompt's last message."""
    if isinstance(messages, str):
        return messages
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
