"""PPO's maths (lightning_vlm.losses: gae, masked_whiten, kl_penalty_rewards, ppo_losses) against
hand-computed values and independent float64 references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lightning_vlm.losses import explained_variance, gae, kl_penalty_rewards, masked_whiten, ppo_losses


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 7.0]])
    values = torch.tensor(
        [[0.5, 0.6, 0.7], [0.2, 0.4, 9.0]]
    )  # row 1 ends after 2 tokens: 7 and 9 are padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: deltas 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * A1
    a1 = 0.1 + 0.95 * 0.3
    assert adv[0].tolist() == pytest.approx([0.1 + 0.95 * a1, a1, 0.3], rel=1e-6)
    # row 1: V after the last token is 0: delta1 = 2 - 0.4, delta0 = 0.5 + 0.4 - 0.2
    assert adv[1].tolist() == pytest.approx([0.7 + 0.95 * 1.6, 1.6, 0.0], rel=1e-6)
    assert ret[1].tolist() == pytest.approx([0.7 + 0.95 * 1.6 + 0.2, 2.0, 0.0], rel=1e-6)
    # lam = gamma = 1: the return is the sum of the rewards still to come
    _, mc = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert mc.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 2.5, 2.0, 0.0], rel=1e-6)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_float64_reference(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    lengths = [6, 3, 1, 5]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i, n in enumerate(lengths):
        r, v = rewards[i].double().tolist()[:n], values[i].double().tolist()[:n]
        want = []
        for t in range(n):  # the forward definition: A_t = sum_k (gamma lam)^k delta_{t+k}
            deltas = [r[k] + gamma * (v[k + 1] if k + 1 < n else 0.0) - v[k] for k in range(t, n)]
            want.append(sum((gamma * lam) ** j * d for j, d in enumerate(deltas)))
        assert adv[i, :n].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert ret[i, :n].tolist() == pytest.approx(
            [a + b for a, b in zip(want, v, strict=True)], rel=1e-5, abs=1e-6
        )
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_masked_whiten_matches_statistics():
    x = torch.tensor([[1.0, 2.0, 50.0], [4.0, 7.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    kept = [1.0, 2.0, 4.0, 7.0, -3.0]
    mean, std = statistics.mean(kept), statistics.stdev(kept)
    out = masked_whiten(x, mask)
    assert out[mask.bool()].tolist() == pytest.approx([(k - mean) / std for k in kept], rel=1e-5)
    assert out[0, 2].item() == 0.0
    scaled = masked_whiten(x, mask, shift_mean=False)
    assert scaled[mask.bool()].tolist() == pytest.approx([(k - mean) / std + mean for k in kept], rel=1e-5)


@pytest.mark.parametrize("kl", ["k1", "k3"])
def test_kl_penalty_rewards_hand_computed(kl):
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -1.7, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, m = kl_penalty_rewards(scores, logps, ref, mask, kl_coef=0.1, kl=kl)

    def k(d: float) -> float:
        return d if kl == "k1" else math.exp(-d) + d - 1

    d = [[0.5, -1.0, 0.0], [0.0, 1.0]]
    want = [[-0.1 * k(x) for x in row] for row in d]
    want[0][2] += 2.0  # the score sits on the last real token
    want[1][1] += -1.0
    assert rewards[0].tolist() == pytest.approx(want[0], rel=1e-6, abs=1e-7)
    assert rewards[1, :2].tolist() == pytest.approx(want[1], rel=1e-6, abs=1e-7)
    assert rewards[1, 2].item() == 0.0  # padding: no KL, no score
    seq_kl = [sum(k(x) for x in row) for row in d]
    assert m["kl"].item() == pytest.approx(sum(seq_kl) / 2, rel=1e-6)
    assert m["non_score_reward"].item() == pytest.approx(-0.1 * sum(seq_kl) / 2, rel=1e-6)
    assert m["scores"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_penalty_rewards(scores, logps, ref, mask, kl="k2")


def test_ppo_clipping_edges_hand_computed():
    old = torch.zeros(4, 1)
    logps = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0], [-1.0], [-1.0], [1.0]])
    # values: inside the clip range (0.1 from old 0), and above it (0.5 > 0 + 0.2) with the return beyond
    values = torch.tensor([[0.1], [0.5], [0.1], [0.1]], requires_grad=True)
    returns = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    loss, m = ppo_losses(logps, old, adv, values, torch.zeros(4, 1), returns, torch.ones(4, 1), vf_coef=0.5)
    loss.backward()
    pg = (-1.2 + 1.5 + 0.8 - 0.5) / 4  # ratio 1.5 with A > 0 and 0.5 with A < 0 are clipped
    vf = 0.5 * (0.01 + (0.2 - 1.0) ** 2 + 0.01 + 0.01) / 4  # row 1: the clipped value (0.2) is further from R
    assert loss.item() == pytest.approx(pg + 0.5 * vf, rel=1e-6)
    assert logps.grad[:, 0].tolist() == pytest.approx([0.0, 1.5 / 4, 0.0, -0.5 / 4], rel=1e-6)
    assert values.grad[:, 0].tolist() == pytest.approx(
        [0.5 * 0.1 / 4, 0.0, 0.5 * 0.1 / 4, 0.5 * 0.1 / 4], rel=1e-6
    )
    assert m["policy/clipfrac"].item() == 0.5 and m["value/clipfrac"].item() == 0.25


@pytest.mark.parametrize("tis", [False, True], ids=["", "tis"])
def test_ppo_losses_match_float64_reference(tis):
    """With ``tis``: engine log-probs whose weights exp(old - sampler) run 0.55 .. 3.3 (the cap, 2, clips
    some); they weight the policy term only, not the value loss."""
    g = torch.Generator().manual_seed(7)
    b, n = 4, 5
    logps = -torch.rand(b, n, generator=g) * 3
    old = logps + (torch.rand(b, n, generator=g) - 0.5) * 0.8
    adv = torch.randn(b, n, generator=g)
    values = torch.randn(b, n, generator=g)
    old_values = values + (torch.rand(b, n, generator=g) - 0.5) * 0.8
    returns = torch.randn(b, n, generator=g)
    mask = torch.ones(b, n)
    mask[1, 2:] = 0
    mask[3, 4:] = 0
    c, cv, coef, cap = 0.2, 0.15, 0.3, 2.0
    sampler = (old + torch.rand(b, n, generator=g) * 1.8 - 1.2).masked_fill(mask == 0, float("nan"))
    x, v = logps.clone().requires_grad_(True), values.clone().requires_grad_(True)
    kw = {"sampler_logps": sampler, "tis_cap": cap} if tis else {}
    loss, m = ppo_losses(
        x, old, adv, v, old_values, returns, mask, cliprange=c, cliprange_value=cv, vf_coef=coef, **kw
    )
    loss.backward()
    tokens, clipped = mask.sum().item(), 0
    total, gx, gv = 0.0, torch.zeros(b, n, dtype=torch.float64), torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        for t in range(n):
            if not mask[i, t]:
                continue
            rho = math.exp(logps[i, t].item() - old[i, t].item())
            w = min(math.exp(old[i, t].item() - sampler[i, t].item()), cap) if tis else 1.0
            clipped += w == cap
            a = adv[i, t].item()
            un, cl = -a * rho, -a * min(max(rho, 1 - c), 1 + c)
            total += w * max(un, cl) / tokens
            gx[i, t] = w * (-a * rho if un >= cl else 0.0) / tokens
            val, ov, ret = values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
            vc = min(max(val, ov - cv), ov + cv)
            e1, e2 = (val - ret) ** 2, (vc - ret) ** 2
            total += coef * 0.5 * max(e1, e2) / tokens
            inside = ov - cv < val < ov + cv
            gv[i, t] = coef * ((val - ret) if e1 >= e2 else ((vc - ret) if inside else 0.0)) / tokens
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert torch.allclose(x.grad.double(), gx, atol=1e-6)
    assert torch.allclose(v.grad.double(), gv, atol=1e-6)
    d = (logps - old)[mask.bool()].double()
    assert m["policy/approxkl"].item() == pytest.approx(0.5 * (d**2).mean().item(), rel=1e-5)
    assert ("rollout/tis_clipped" in m) == tis
    if tis:
        assert 0 < clipped < tokens and m["rollout/tis_clipped"].item() == pytest.approx(clipped / tokens)


def test_ppo_losses_without_engine_logps_or_cap_are_unchanged():
    """No correction unless both ``sampler_logps`` and ``tis_cap`` are given: bitwise the plain call."""
    g = torch.Generator().manual_seed(3)
    logps, adv, values, returns = (torch.randn(3, 4, generator=g) for _ in range(4))
    old, mask = logps + 0.1 * torch.randn(3, 4, generator=g), torch.ones(3, 4)
    sampler = old - 1.0  # weights e (clipped at 2) if they applied
    results = []
    for kw in ({}, {"tis_cap": 2.0}, {"sampler_logps": sampler}, {"sampler_logps": sampler, "tis_cap": 2.0}):
        x = logps.clone().requires_grad_(True)
        loss, m = ppo_losses(x, old, adv, values, values, returns, mask, **kw)
        loss.backward()
        results.append((loss, m, x.grad))
    for loss, m, grad in results[1:3]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][2])
        assert m.keys() == results[0][1].keys() and all(torch.equal(m[k], results[0][1][k]) for k in m)
    assert not torch.equal(results[3][0], results[0][0])  # with both, the correction applies
    assert torch.equal(results[3][1]["value/loss"], results[0][1]["value/loss"])  # not weighted


def test_explained_variance_matches_statistics():
    values = torch.tensor([[0.5, 1.0, 9.0], [2.0, 0.0, 9.0]])
    returns = torch.tensor([[1.0, 2.0, 7.0], [1.5, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the third column is padding
    r, v = [1.0, 2.0, 1.5, -1.0], [0.5, 1.0, 2.0, 0.0]
    expected = 1 - statistics.pvariance([a - b for a, b in zip(r, v, strict=True)]) / statistics.pvariance(r)
    assert float(explained_variance(values, returns, mask)) == pytest.approx(expected, rel=1e-6)
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)  # a perfect critic
    flat = torch.ones(2, 3)
    assert math.isnan(float(explained_variance(values, flat, mask)))  # returns that do not vary
