"""Checkpoints written atomically: a file or folder is written under a temporary name next to its target
(never in TMPDIR, which may be another filesystem, where a rename becomes a copy) and renamed into place,
so a kill during a save leaves the previous checkpoint or none, never a truncated one at the final name.
What a killed save leaves behind (``.<name>.partial-<pid>``, ``.<name>.previous``) is cleaned up at the
next save. One run writes a checkpoint folder at a time. Reading: ``read_checkpoint`` for ``--ckpt_path``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy as _ModelParallelStrategy


def read_checkpoint(path: str) -> dict[str, Any]:
    """The Lightning checkpoint at ``path`` (a file, or a distributed checkpoint's folder: its ``meta.pt``),
    loaded weights-only with its tensors memory-mapped; an error naming ``path`` when it is not one."""
    where = Path(path)
    file = where / "meta.pt" if where.is_dir() else where
    if not where.exists():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file or folder")
    if not file.is_file():
        raise ValueError(f"--ckpt_path {path}: a folder without meta.pt, so not a distributed checkpoint")
    if file.stat().st_size == 0:
        raise ValueError(f"--ckpt_path {path}: the file is empty (a save that was cut short?)")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch's own message may advise an unsafe load: never pass that on
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        why = f"it holds a Python object ({found[1]}) that a weights-only load refuses" if found else None
        why = why or "not a PyTorch checkpoint (truncated, or another kind of file)"
        raise ValueError(f"--ckpt_path {path}: {why}") from None
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        raise ValueError(
            f"--ckpt_path {path}: not a Lightning checkpoint (a bare state dict or weights file?)"
        )
    return checkpoint


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial-\d+|previous)$")


def partial_path(target: Path) -> Path:
    """Where ``target`` is written before it is renamed into place."""
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def clean_leftovers(folder: Path, name: str | None = None) -> None:
    """Undo what killed saves left in ``folder`` (only those of ``name`` when given): a previous version moved
    aside goes back to its name when the new one never arrived; partial copies are removed."""
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        found = _LEFTOVER.match(entry.name)
        if found and name in (None, found["name"]):
            final = folder / found["name"]
            if entry.name.endswith(".previous") and not final.exists():
                os.replace(entry, final)
            else:
                _remove(entry)


def replace(partial: Path, target: Path) -> None:
    """Move the finished ``partial`` to ``target``. A previous folder at ``target`` waits at ``.<name>.previous``
    until the new one is in place, so one of the two is always whole (``clean_leftovers`` puts it back)."""
    previous = target.with_name(f".{target.name}.previous")
    _remove(previous)
    if target.is_dir() or (partial.is_dir() and target.exists()):  # a file over a file is one step
        os.replace(target, previous)
    try:
        os.replace(partial, target)
    except BaseException:
        if previous.exists():
            os.replace(previous, target)
        raise
    _remove(previous)
    if os.name == "posix":  # make the rename durable
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` for single-file checkpoints (one device, DDP), writing a local file to
    a temporary name in the target's folder, fsynced, then ``os.replace``-d into place. The ``lightning-vlm``
    command uses it unless the trainer is given another ``CheckpointIO``; remote paths keep Lightning's way."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target.parent)
        partial = partial_path(target)
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


class ModelParallelStrategy(_ModelParallelStrategy):
    """Lightning's FSDP2 strategy whose distributed checkpoint (a folder: one shard per rank and ``meta.pt``)
    is written to a temporary sibling by every rank, then renamed into place by rank 0, so a kill during a
    save never leaves a folder with some ranks' shards, or old and new shards mixed, at the final name."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if not self._save_distributed_checkpoint:  # one file, through the CheckpointIO
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        target = Path(self.broadcast(str(filepath)))
        partial = Path(self.broadcast(str(partial_path(target))))  # rank 0's name on every rank
        if self.global_rank == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            clean_leftovers(target.parent)
        self.barrier("atomic_checkpoint_clean")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            self.barrier("atomic_checkpoint_written")
            if self.global_rank == 0:
                replace(partial, target)
        finally:
            if self.global_rank == 0 and partial.exists():
                _remove(partial)
        self.barrier("atomic_checkpoint_replaced")
