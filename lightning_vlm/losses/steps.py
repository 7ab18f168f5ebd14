"""Normalising a loss that one optimiser step computes in several chunks (gradient accumulation,
mini-batch splits, ranks), so that the update does not depend on how the step was split."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepTotals:
    """The kept completion tokens and kept sequences of a whole optimiser step, summed over its
    chunks and ranks and divided by the number of ranks (DDP averages the ranks' gradients)."""

    tokens: torch.Tensor | float
    sequences: torch.Tensor | float


def over_step(
    loss: torch.Tensor, mask: torch.Tensor, totals: StepTotals | None, tokens: bool
) -> torch.Tensor:
    """A chunk's loss, normalised by the chunk's own count of the unit (tokens of ``mask``, or its
    rows), renormalised to the step's count of that unit. With ``totals`` None: ``loss`` unchanged.
    The loss function picks the unit it divided by, so the two cannot disagree."""
    if totals is None:
        return loss
    if tokens:
        return loss * mask.sum().clamp(min=1.0) / totals.tokens
    return loss * mask.new_tensor(float(mask.shape[0])) / totals.sequences
