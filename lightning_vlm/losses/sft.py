"""Supervised fine-tuning: the token-mean negative log-likelihood."""

from __future__ import annotations

import torch

Metrics = dict[str, torch.Tensor]


def sft_loss(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Token-mean negative log-likelihood over the target tokens of the whole batch: ``(loss, {"nll": loss,
    "tokens": count})``; the loss is 0 (with a gradient path) when the mask is empty.

    Args:
        logps: (B, L) log-probability of each target token.
        mask: (B, L) 1 on tokens that count.
    """
    mask = mask.to(logps.dtype)
    tokens = mask.sum()
    loss = -(logps * mask).sum() / tokens.clamp(min=1.0)
    return loss, {"nll": loss.detach(), "tokens": tokens.detach()}
