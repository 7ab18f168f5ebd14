"""Loss functions against hand-computed values and an independent float64 reference."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lightning_vlm.losses import (
    bco_pair_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    gspo_loss,
    hinge_loss,
    ipo_loss,
    reward_model_loss,
    sft_loss,
)


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


# ---------------------------------------------------------------- preference losses
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


# ---------------------------------------------------------------- online RL losses
def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv, m = group_advantages(rewards, group_size=3)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0)
    want = [(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(want, rel=1e-6)
    assert m["zero_std_groups"].item() == 0.5 and m["reward_mean"].item() == pytest.approx(4 / 6)
    none, _ = group_advantages(rewards, 3, scale="none")
    assert none.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], abs=1e-7)
    batch, _ = group_advantages(rewards, 3, scale="batch")
    assert batch.tolist() == pytest.approx(
        [x / (statistics.stdev(rewards.tolist()) + 1e-4) for x in none.tolist()], rel=1e-6
    )
    with pytest.raises(ValueError, match="G=4"):
        group_advantages(rewards, 4)


def test_group_advantages_match_float64_reference():
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(24, generator=g)
    for scale in ("group", "batch", "none"):
        adv, _ = group_advantages(rewards, 6, scale=scale)
        vals = rewards.double().tolist()
        want = []
        for k in range(0, 24, 6):
            grp = vals[k : k + 6]
            mean = sum(grp) / 6
            div = {
                "group": statistics.stdev(grp) + 1e-4,
                "batch": statistics.stdev(vals) + 1e-4,
                "none": 1.0,
            }[scale]
            want += [(x - mean) / div for x in grp]
        assert adv.double().tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)


def _rl_case(seed: int, b: int = 4, length: int = 5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, length, generator=g) * 3
    old = logps + (torch.rand(b, length, generator=g) - 0.5) * 0.6  # ratios ~ 0.74 .. 1.35
    ref = logps + (torch.rand(b, length, generator=g) - 0.5)
    adv = torch.randn(b, generator=g)
    mask = torch.ones(b, length)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return logps, old, ref, adv, mask


def _surrogate(rho: float, a: float, lo: float, hi: float) -> tuple[float, float]:
    """-min(rho*A, clip(rho)*A) and its derivative in log rho."""
    clipped = min(max(rho, 1 - lo), 1 + hi)
    if rho * a <= clipped * a:  # the unclipped term is the min (ties inside the range too)
        return -rho * a, -rho * a
    return -clipped * a, 0.0


@pytest.mark.parametrize("norm", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_float64_reference(norm, beta):
    logps, old, ref, adv, mask = _rl_case(11)
    lo, hi, max_len = 0.2, 0.28, 8
    x = logps.clone().requires_grad_(True)
    loss, m = grpo_loss(x, old, adv, mask, eps_low=lo, eps_high=hi, beta=beta, ref_logps=ref, norm=norm,
                        max_completion_length=max_len)  # fmt: skip
    loss.backward()
    b, length = logps.shape
    lp, od, rf, mk = (t.double().tolist() for t in (logps, old, ref, mask))
    per, grad = [[0.0] * length for _ in range(b)], [[0.0] * length for _ in range(b)]
    for i in range(b):
        for t in range(length):
            value, d = _surrogate(math.exp(lp[i][t] - od[i][t]), adv[i].item(), lo, hi)
            dk = rf[i][t] - lp[i][t]
            per[i][t] = value + beta * (math.exp(dk) - dk - 1)
            grad[i][t] = d + beta * (1 - math.exp(dk))
    n_tok = sum(map(sum, mk))
    weight = [
        [mk[i][t] * {"grpo": 1 / (sum(mk[i]) * b), "bnpo": 1 / n_tok, "dapo": 1 / n_tok, "dr_grpo": 1 / (b * max_len)}[norm]
         for t in range(length)]
        for i in range(b)
    ]  # fmt: skip
    want = sum(per[i][t] * weight[i][t] for i in range(b) for t in range(length))
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    want_grad = torch.tensor([[grad[i][t] * weight[i][t] for t in range(length)] for i in range(b)])
    assert torch.allclose(x.grad.double(), want_grad.double(), atol=1e-6)
    assert ("kl" in m) == (beta > 0)


def test_grpo_clipping_edges_hand_computed():
    mask = torch.ones(4, 1)
    old = torch.zeros(4, 1)
    # ratios 1.5 (A>0: clipped at 1.28), 1.5 (A<0: not clipped), 0.5 (A<0: clipped at 0.8), 0.5 (A>0: not clipped)
    logps = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, m = grpo_loss(logps, old, adv, mask, eps_low=0.2, eps_high=0.28, norm="bnpo")
    loss.backward()
    assert loss.item() == pytest.approx((-1.28 + 1.5 + 0.8 - 0.5) / 4, rel=1e-6)
    assert logps.grad[:, 0].tolist() == pytest.approx([0.0, 1.5 / 4, 0.0, -0.5 / 4], rel=1e-6)
    assert m["clip/high"].item() == 0.25 and m["clip/low"].item() == 0.25
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(logps, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, adv, mask, norm="dr_grpo")


def test_on_policy_grpo_is_the_policy_gradient():
    """ratio == 1 on-policy: the loss is -A, and its gradient -A per token, reduced by the norm."""
    logps, _, _, adv, mask = _rl_case(3)
    x = logps.clone().requires_grad_(True)
    loss, m = grpo_loss(x, logps, adv, mask, norm="grpo")
    loss.backward()
    assert loss.item() == pytest.approx(-adv.mean().item(), rel=1e-6)
    assert m["ratio"].item() == 1.0 and m["clip/low"].item() == m["clip/high"].item() == 0.0
    want = -adv[:, None] * mask / mask.sum(-1, keepdim=True) / len(adv)
    assert torch.allclose(x.grad, want, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_loss_matches_float64_reference(beta):
    logps, _, ref, _, mask = _rl_case(5)
    # sequence log-ratios: above the ceiling (A > 0: clipped), below the floor (A < 0: clipped),
    # and two inside the range; per-token noise that the masked mean keeps
    shift = torch.tensor([1e-3, -1e-3, 1e-4, -1e-4])[:, None]
    noise = (torch.arange(5.0) - 2.0)[None, :] * 1e-3
    old = logps - shift - noise
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    lo, hi = 3e-4, 4e-4
    b, length = logps.shape
    results = []
    for token_level in (False, True):
        x = logps.clone().requires_grad_(True)
        loss, m = gspo_loss(
            x, old, adv, mask, eps_low=lo, eps_high=hi, beta=beta, ref_logps=ref, token_level=token_level
        )
        loss.backward()
        results.append((loss.item(), x.grad.clone(), m))
    lp, od, rf, mk = (t.double().tolist() for t in (logps, old, ref, mask))
    want, want_grad, clipped = 0.0, torch.zeros(b, length, dtype=torch.float64), 0
    for i in range(b):
        n = sum(mk[i])
        s = math.exp(sum((lp[i][t] - od[i][t]) * mk[i][t] for t in range(length)) / n)
        value, d = _surrogate(s, adv[i].item(), lo, hi)
        clipped += d == 0.0
        kl = (
            sum((math.exp(rf[i][t] - lp[i][t]) - (rf[i][t] - lp[i][t]) - 1) * mk[i][t] for t in range(length))
            / n
        )
        want += (value + beta * kl) / b
        for t in range(length):
            if mk[i][t]:
                want_grad[i, t] = (d + beta * (1 - math.exp(rf[i][t] - lp[i][t]))) / n / b
    assert 0 < clipped < b  # the case exercises both branches
    for loss, grad, _ in results:  # GSPO-token equals GSPO when advantages are per sequence
        assert loss == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert torch.allclose(grad.double(), want_grad, atol=1e-6)
    assert results[0][2]["clip/low"] + results[0][2]["clip/high"] == pytest.approx(clipped / b)
