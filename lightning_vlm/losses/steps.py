"""What the online losses share: normalising a loss that one optimiser step computes in several chunks
(gradient accumulation, mini-batch splits, ranks), so that the update does not depend on how the step
was split; and truncated importance sampling, for a sampler whose numerics are not the trainer's."""

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


def tis_weights(
    old_logps: torch.Tensor,
    sampler_logps: torch.Tensor | None,
    mask: torch.Tensor,
    cap: float | None,
    sequence: bool = False,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Truncated importance sampling (Yao et al. 2025, https://fengyao.notion.site/off-policy-rl): the
    detached weights ``min(pi_old / pi_sampler, cap)`` of the policy-gradient term, ``pi_old`` the
    trainer's probabilities at the sampling weights, ``pi_sampler`` the engine's.

    Args:
        old_logps: (B, L) the trainer's log-probs at the sampling weights.
        sampler_logps: (B, L) the engine's log-probs of the same tokens; None: no correction.
        mask: (B, L) 1 on the tokens that train.
        cap: The truncation C; None: no correction.
        sequence: One weight per sequence from the masked mean of the log-ratios (GSPO's geometric mean).

    Returns:
        ``(weights (B, L), or (B,) with sequence, {"rollout/tis_clipped": fraction of the kept weights the
        cap clipped})``, or ``(None, {})`` without a correction.
    """
    if sampler_logps is None or cap is None:
        return None, {}
    mask = mask.to(old_logps.dtype)
    d = torch.where(mask > 0, (old_logps - sampler_logps.to(old_logps.dtype)).detach(), 0.0)  # (B, L)
    if sequence:
        d, mask = d.sum(-1) / mask.sum(-1).clamp(min=1.0), (mask.sum(-1) > 0).to(d.dtype)  # (B,)
    w = torch.exp(d)
    clipped = ((w > cap).to(d.dtype) * mask).sum() / mask.sum().clamp(min=1.0)
    return w.clamp(max=cap), {"rollout/tis_clipped": clipped}
