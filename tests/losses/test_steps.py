"""One optimiser step computed in chunks: with the step's totals, the chunks' losses (and gradients)
add up to the loss of the whole step, for every loss the online loop splits."""

from __future__ import annotations

import pytest
import torch

from lightning_vlm.losses import StepTotals, grpo_loss, gspo_loss, over_step, ppo_losses

B, L = 6, 5


def _case():
    g = torch.Generator().manual_seed(3)
    logps = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    old = logps + (torch.rand(B, L, generator=g, dtype=torch.float64) - 0.5) * 0.6
    ref = logps + (torch.rand(B, L, generator=g, dtype=torch.float64) - 0.5)
    mask = torch.ones(B, L, dtype=torch.float64)
    mask[0, 3:] = 0
    mask[4, 1:] = 0  # sequences of different lengths: token and sequence totals differ
    per_token = torch.randn(B, L, generator=g, dtype=torch.float64)
    return logps, old, ref, torch.randn(B, generator=g, dtype=torch.float64), per_token, mask


LOSSES = {
    **{
        f"grpo-{norm}": lambda lp, old, ref, adv, tok, m, totals, norm=norm: grpo_loss(
            lp, old, adv, m, beta=0.04, ref_logps=ref, norm=norm, max_completion_length=L, totals=totals
        )
        for norm in ("grpo", "bnpo", "dapo", "dr_grpo")
    },
    "gspo": lambda lp, old, ref, adv, tok, m, totals: gspo_loss(
        lp, old, adv, m, eps_low=0.1, eps_high=0.1, beta=0.04, ref_logps=ref, totals=totals
    ),
    "gspo-token": lambda lp, old, ref, adv, tok, m, totals: gspo_loss(
        lp, old, adv, m, eps_low=0.1, eps_high=0.1, token_level=True, totals=totals
    ),
    "ppo": lambda lp, old, ref, adv, tok, m, totals: ppo_losses(
        lp, old, tok, lp * 0.5, old * 0.5, tok, m, totals=totals
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_chunks_with_the_step_totals_add_up_to_the_whole_step(name):
    fn = LOSSES[name]
    logps, old, ref, adv, per_token, mask = _case()
    whole_logps = logps.clone().requires_grad_(True)
    whole, _ = fn(whole_logps, old, ref, adv, per_token, mask, None)  # the step's own normalisation
    whole.backward()
    totals = StepTotals(tokens=mask.sum(), sequences=float(B))
    chunk_logps = logps.clone().requires_grad_(True)
    parts = []
    for rows in ([0, 3], [1, 4, 5], [2]):  # uneven chunks
        r = torch.tensor(rows)
        loss, _ = fn(chunk_logps[r], old[r], ref[r], adv[r], per_token[r], mask[r], totals)
        parts.append(loss)
    total = torch.stack(parts).sum()
    total.backward()
    assert torch.allclose(total, whole, rtol=1e-12, atol=1e-12)
    assert whole_logps.grad.abs().sum() > 0
    assert torch.allclose(chunk_logps.grad, whole_logps.grad, rtol=1e-12, atol=1e-12)


def test_over_step_renormalises_by_the_unit_the_loss_divided_by():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = torch.tensor(2.0)
    assert over_step(loss, mask, None, tokens=True) is loss
    assert over_step(loss, mask, StepTotals(tokens=6.0, sequences=4.0), tokens=True) == pytest.approx(
        2.0 * 3 / 6
    )
    assert over_step(loss, mask, StepTotals(tokens=6.0, sequences=4.0), tokens=False) == pytest.approx(
        2.0 * 2 / 4
    )
