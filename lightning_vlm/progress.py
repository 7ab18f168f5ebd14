"""What a run shows while it trains: the live bar in a terminal; elsewhere (nohup, SLURM, CI), where a
bar shows nothing until the run ends, a plain line every N optimiser steps."""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any, TextIO

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE


def default_bar(stream: TextIO, every_n_steps: int | None = None) -> ProgressBar:
    """The live bar when ``stream`` is a terminal, else :class:`ProgressLine`."""
    if not stream.isatty():
        return ProgressLine(every_n_steps)
    return RichBar() if _RICH_AVAILABLE else TQDMProgressBar()  # rich comes with transformers (typer)


class RichBar(RichProgressBar):
    """Lightning's rich bar, with the epoch's true total and ``Epoch 3``, not ``Epoch 3/-2``, when
    ``max_steps`` ends the run (Lightning then sets ``max_epochs`` to -1).

    Lightning's total, ``min(batches, max_steps - global_step)``, leaves out the batches an interrupted
    epoch ran before a resume (the bar of a resumed epoch is made at its first batch: ``54/30``), and
    counts optimiser steps as batches (an online objective makes ``steps_per_batch`` per batch)."""

    _epoch_start = False

    @property
    def total_train_batches(self) -> int | float:
        """Batches the epoch runs, counted from its start, as the bar's position (``batch_idx + 1``) is."""
        trainer = self.trainer
        if trainer.max_steps < 0:
            return trainer.num_training_batches
        per_batch = getattr(trainer.lightning_module, "steps_per_batch", 1 / trainer.accumulate_grad_batches)
        loop = trainer.fit_loop.epoch_loop  # at a new epoch's start, its count is still the last epoch's
        done = loop.batch_progress.current.ready if loop.restarting or not self._epoch_start else 0
        left = math.ceil((trainer.max_steps - trainer.global_step) / per_batch)
        return min(trainer.num_training_batches, done + left)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = True  # not called for an epoch resumed mid-way: its bar is made at a batch end
        try:
            super().on_train_epoch_start(trainer, pl_module)
        finally:
            self._epoch_start = False

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs != -1:
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch}".ljust(len(self.validation_description))


class ProgressLine(ProgressBar):
    """A plain line every ``every_n_steps`` optimiser steps and at the end, for logs that are not a
    terminal, and the ``val/`` metrics after each validation during ``fit``::

        step 40/300  loss 0.5123  lr 0.0001  1,234 tok/s  reward 0.4125  eta 0:05:12

    ``reward``: the rollout's mean reward (online objectives). ``tok/s``: tokens of the training batches
    and, for online objectives, the sampled completions, in this process since training started.
    ``eta``: the time per step so far (validation included) times the steps left.
    """

    def __init__(self, every_n_steps: int | None = None):
        """
        Args:
            every_n_steps: Optimiser steps between lines (default: ``trainer.log_every_n_steps``).
        """
        super().__init__()
        self.every_n_steps, self._enabled = every_n_steps, True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._tokens = time.monotonic(), 0.0
        self._step0 = self._shown = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        sampled = trainer.callback_metrics.get("rollout/tokens", 0.0)  # online objectives
        self._tokens += float(sampled) + (float(mask.sum()) if mask is not None else 0.0)
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step // every > self._shown // every:
            self._line(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._shown:
            self._line(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            val = sorted((k, float(v)) for k, v in trainer.callback_metrics.items() if k.startswith("val/"))
            self._print(f"validation at step {trainer.global_step}", *(f"{k} {v:.4g}" for k, v in val))

    def _line(self, trainer) -> None:
        self._shown = step = trainer.global_step
        total, metrics = trainer.estimated_stepping_batches, trainer.callback_metrics
        elapsed, steps = time.monotonic() - self._t0, step - self._step0
        parts = [f"step {step}/{total}" if math.isfinite(total) else f"step {step}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4g}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        parts.append(f"{self._tokens / max(elapsed, 1e-9):,.0f} tok/s")
        if "rollout/reward" in metrics:
            parts.append(f"reward {float(metrics['rollout/reward']):.4g}")
        if math.isfinite(total) and steps > 0:
            parts.append(f"eta {timedelta(seconds=round(elapsed / steps * max(0, total - step)))}")
        self._print(*parts)

    def _print(self, *parts: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print("  ".join(parts), flush=True)  # flushed: a pipe is block-buffered
