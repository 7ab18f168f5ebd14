"""The SFT loss against hand-computed values and a float64 reference."""

from __future__ import annotations

import math

import torch

from lightning_vlm.losses import sft_loss


def test_sft_loss_hand_computed():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = sft_loss(logps, mask)
    # (1 + 2 + 0.5) / 3 tokens; the masked -3, -9 and -4 must not count
    assert math.isclose(loss.item(), 3.5 / 3, rel_tol=1e-6)
    assert metrics["tokens"].item() == 3
    assert not metrics["nll"].requires_grad


def test_sft_loss_matches_float64_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 7, generator=g) * 5
    mask = torch.rand(4, 7, generator=g) > 0.4
    x32 = logps.clone().requires_grad_(True)
    loss, _ = sft_loss(x32, mask)
    loss.backward()

    x64 = logps.double().clone().requires_grad_(True)
    terms = [-x64[i, j] for i in range(4) for j in range(7) if mask[i, j]]
    ref = sum(terms) / len(terms)
    ref.backward()
    assert torch.allclose(loss.double(), ref, atol=1e-6)
    assert torch.allclose(x32.grad.double(), x64.grad, atol=1e-7)
    assert (x32.grad[~mask] == 0).all()


def test_sft_loss_empty_mask_is_zero_not_nan():
    logps = torch.randn(2, 3, requires_grad=True)
    loss, metrics = sft_loss(logps, torch.zeros(2, 3))
    assert loss.item() == 0.0 and metrics["tokens"].item() == 0
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros(2, 3))
