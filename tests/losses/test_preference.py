"""Preference losses (DPO, IPO, hinge, BCO, Bradley-Terry) against hand-computed values and an
independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_vlm.losses import bco_pair_loss, dpo_loss, hinge_loss, ipo_loss, reward_model_loss

# Float64 references written element by element with `math`, gradients from their closed forms
# (not autograd), so they share no code path with the implementations.


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _pairs(seed: int, n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g) * 30) for _ in range(4)]  # c, r, rc, rr: summed log-probs


def _run(fn, tensors, **kw):
    xs = [t.clone().requires_grad_(True) for t in tensors]
    loss, metrics = fn(*xs, **kw)
    loss.backward()
    return loss.item(), [x.grad for x in xs], metrics


def _ref(per_pair):
    """Mean over pairs of per-pair (loss, dc, dr, drc, drr) computed in float64 Python."""
    rows = [per_pair(i) for i in range(len(per_pair.data[0]))]
    n = len(rows)
    loss = sum(r[0] for r in rows) / n
    grads = [torch.tensor([r[k] / n for r in rows], dtype=torch.float64) for k in range(1, 5)]
    return loss, grads


def _check(fn, per_pair, tensors, **kw):
    per_pair.data = [t.double().tolist() for t in tensors]
    loss, grads, metrics = _run(fn, tensors, **kw)
    ref_loss, ref_grads = _ref(per_pair)
    assert math.isclose(loss, ref_loss, rel_tol=1e-5, abs_tol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got.double(), want, atol=1e-6), (got, want)
    assert all(not v.requires_grad for v in metrics.values())
    return metrics


def test_dpo_loss_hand_computed():
    # c - rc = 0.5, r - rr = -0.5: z = 0.1 * 1.0, loss = log(1 + e^-0.1)
    t = [torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])]
    loss, grads, m = _run(dpo_loss, t, beta=0.1)
    assert math.isclose(loss, math.log(1 + math.exp(-0.1)), rel_tol=1e-6)
    assert math.isclose(grads[0].item(), -0.1 * _sig(-0.1), rel_tol=1e-5)
    assert math.isclose(m["rewards/chosen"].item(), 0.05, rel_tol=1e-5)
    assert math.isclose(m["rewards/rejected"].item(), -0.05, rel_tol=1e-5)
    assert math.isclose(m["rewards/margins"].item(), 0.1, rel_tol=1e-5)
    assert m["rewards/accuracies"].item() == 1.0 and m["logps/rejected"].item() == -2.0


@pytest.mark.parametrize("beta,smooth", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_loss_matches_float64_reference(beta, smooth):
    def per_pair(i):
        c, r, rc, rr = (col[i] for col in per_pair.data)
        z = beta * ((c - rc) - (r - rr))
        loss = -(1 - smooth) * math.log(_sig(z)) - smooth * math.log(_sig(-z))
        dz = -(1 - smooth) * _sig(-z) + smooth * _sig(z)
        return loss, beta * dz, -beta * dz, -beta * dz, beta * dz

    m = _check(dpo_loss, per_pair, _pairs(1), beta=beta, label_smoothing=smooth)
    c, r, rc, rr = _pairs(1)
    assert m["rewards/accuracies"].item() == ((c - rc) > (r - rr)).float().mean().item()


def test_ipo_loss_hand_computed_and_float64_reference():
    t = [torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])]
    loss, _, _ = _run(ipo_loss, t, beta=0.25)  # gap 1.0, target 1/(2*0.25) = 2: (1 - 2)^2
    assert math.isclose(loss, 1.0, rel_tol=1e-6)
    beta = 0.1

    def per_pair(i):
        c, r, rc, rr = (col[i] for col in per_pair.data)
        e = (c - rc) - (r - rr) - 1 / (2 * beta)
        return e * e, 2 * e, -2 * e, -2 * e, 2 * e

    _check(ipo_loss, per_pair, [x / 10 for x in _pairs(2)], beta=beta)


def test_hinge_loss_hand_computed_and_float64_reference():
    t = [
        torch.tensor([-1.0, -1.0]),
        torch.tensor([-2.0, -1.0]),
        torch.tensor([-1.5, -1.0]),
        torch.tensor([-1.5, -9.0]),
    ]
    loss, grads, _ = _run(hinge_loss, t, beta=0.1)
    # pair 0: 1 - 0.1 * 1.0 = 0.9; pair 1: gap 0 - 8 = -8, 1 + 0.8 = 1.8
    assert math.isclose(loss, (0.9 + 1.8) / 2, rel_tol=1e-6)
    beta = 0.5

    def per_pair(i):
        c, r, rc, rr = (col[i] for col in per_pair.data)
        h = 1 - beta * ((c - rc) - (r - rr))
        d = -beta if h > 0 else 0.0
        return max(h, 0.0), d, -d, -d, d

    _check(hinge_loss, per_pair, [x / 20 for x in _pairs(3)], beta=beta)
    # Past the margin the loss is 0 and nothing moves.
    far = [torch.tensor([0.0]), torch.tensor([-50.0]), torch.tensor([0.0]), torch.tensor([0.0])]
    loss, grads, _ = _run(hinge_loss, far, beta=0.1)
    assert loss == 0.0 and all(g.abs().sum() == 0 for g in grads)


@pytest.mark.parametrize("delta", [0.0, 0.3, -1.2])
def test_bco_pair_loss_matches_float64_reference(delta):
    beta = 0.1

    def per_pair(i):
        c, r, rc, rr = (col[i] for col in per_pair.data)
        a, b = beta * (c - rc) - delta, beta * (r - rr) - delta
        loss = -math.log(_sig(a)) - math.log(_sig(-b))
        dc, dr = -beta * _sig(-a), beta * _sig(b)
        return loss, dc, dr, -dc, -dr

    m = _check(bco_pair_loss, per_pair, _pairs(4), beta=beta, delta=torch.tensor(delta))
    c, r, rc, rr = _pairs(4)
    assert math.isclose(
        m["rewards/batch_mean"].item(), (beta * torch.cat([c - rc, r - rr])).mean().item(), rel_tol=1e-5
    )


def test_bco_pair_loss_hand_computed():
    # chosen reward 0.1 * 1 = 0.1, rejected 0.1 * -1 = -0.1, delta 0.1:
    # -logsig(0) - logsig(0.2) = log 2 + log(1 + e^-0.2)
    t = [torch.tensor([-1.0]), torch.tensor([-2.5]), torch.tensor([-2.0]), torch.tensor([-1.5])]
    loss, _, m = _run(bco_pair_loss, t, beta=0.1, delta=0.1)
    assert math.isclose(loss, math.log(2) + math.log(1 + math.exp(-0.2)), rel_tol=1e-6)
    assert math.isclose(m["rewards/batch_mean"].item(), 0.0, abs_tol=1e-7)


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (True, 0.01)])
def test_reward_model_loss_matches_float64_reference(with_margin, center):
    g = torch.Generator().manual_seed(5)
    rc, rr, margin = (torch.randn(7, generator=g) * 2 for _ in range(3))
    xs = [rc.clone().requires_grad_(True), rr.clone().requires_grad_(True)]
    loss, m = reward_model_loss(*xs, margin=margin if with_margin else None, center_coef=center)
    loss.backward()
    n, want, d_c, d_r = 7, 0.0, [], []
    for a, b, mg in zip(rc.double().tolist(), rr.double().tolist(), margin.double().tolist(), strict=True):
        x = a - b - (mg if with_margin else 0.0)
        k = center or 0.0
        want += (-math.log(_sig(x)) + k * (a + b) ** 2) / n
        d_c.append((-_sig(-x) + 2 * k * (a + b)) / n)
        d_r.append((_sig(-x) + 2 * k * (a + b)) / n)
    assert math.isclose(loss.item(), want, rel_tol=1e-5)
    assert torch.allclose(xs[0].grad.double(), torch.tensor(d_c, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(xs[1].grad.double(), torch.tensor(d_r, dtype=torch.float64), atol=1e-6)
    assert m["accuracy"].item() == (rc > rr).float().mean().item()
    assert math.isclose(m["margin"].item(), (rc - rr).mean().item(), rel_tol=1e-5)


def test_reward_model_loss_hand_computed():
    loss, m = reward_model_loss(
        torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), margin=torch.tensor([1.0, 0.0])
    )
    # pair 0: -logsig(1 - 0 - 1) = log 2; pair 1: -logsig(-1) = log(1 + e)
    assert math.isclose(loss.item(), (math.log(2) + math.log(1 + math.e)) / 2, rel_tol=1e-6)
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == 0.0
    centred, _ = reward_model_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_coef=0.5)
    assert math.isclose(centred.item(), math.log(2) + 0.5 * 4.0, rel_tol=1e-6)
