"""Group-relative online RL losses (group advantages, GRPO and its variants, GSPO) against
hand-computed values and an independent float64 reference."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lightning_vlm.losses import group_advantages, grpo_loss, gspo_loss


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


CAP = 2.0  # truncated importance sampling's cap in the cases below


def _sampler(old: torch.Tensor, mask: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Engine log-probs ``old + shift`` (weights exp(-shift), some above CAP), NaN on padding (never read)."""
    return (old + shift).masked_fill(mask == 0, float("nan"))


def _tis(od: list[float], sp: list[float], mk: list[float]) -> list[float]:
    """Float64 truncated importance-sampling weights of one sequence's tokens (1 on padding)."""
    return [min(math.exp(o - s), CAP) if m else 1.0 for o, s, m in zip(od, sp, mk, strict=True)]


def _surrogate(rho: float, a: float, lo: float, hi: float) -> tuple[float, float]:
    """-min(rho*A, clip(rho)*A) and its derivative in log rho."""
    clipped = min(max(rho, 1 - lo), 1 + hi)
    if rho * a <= clipped * a:  # the unclipped term is the min (ties inside the range too)
        return -rho * a, -rho * a
    return -clipped * a, 0.0


@pytest.mark.parametrize("norm", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("tis", [False, True], ids=["", "tis"])
def test_grpo_loss_matches_float64_reference(norm, beta, tis):
    """With ``tis``: engine log-probs whose weights exp(old - sampler) run 0.55 .. 3.3, so the cap clips some."""
    logps, old, ref, adv, mask = _rl_case(11)
    lo, hi, max_len = 0.2, 0.28, 8
    shift = torch.rand(logps.shape, generator=torch.Generator().manual_seed(1)) * 1.8 - 1.2
    sampler = _sampler(old, mask, shift) if tis else None
    x = logps.clone().requires_grad_(True)
    loss, m = grpo_loss(x, old, adv, mask, eps_low=lo, eps_high=hi, beta=beta, ref_logps=ref, norm=norm,
                        max_completion_length=max_len, sampler_logps=sampler, tis_cap=CAP)  # fmt: skip
    loss.backward()
    b, length = logps.shape
    lp, od, rf, mk = (t.double().tolist() for t in (logps, old, ref, mask))
    sp = sampler.double().tolist() if tis else od
    per, grad = [[0.0] * length for _ in range(b)], [[0.0] * length for _ in range(b)]
    for i in range(b):
        w = _tis(od[i], sp[i], mk[i])  # 1 everywhere without engine log-probs
        for t in range(length):
            value, d = _surrogate(math.exp(lp[i][t] - od[i][t]), adv[i].item(), lo, hi)
            dk = rf[i][t] - lp[i][t]
            per[i][t] = w[t] * value + beta * (math.exp(dk) - dk - 1)  # the KL is not reweighted
            grad[i][t] = w[t] * d + beta * (1 - math.exp(dk))
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
    assert ("rollout/tis_clipped" in m) == tis
    if tis:
        raw = [math.exp(od[i][t] - sp[i][t]) for i in range(b) for t in range(length) if mk[i][t]]
        clipped = sum(r > CAP for r in raw)
        assert 0 < clipped < len(raw) and m["rollout/tis_clipped"].item() == pytest.approx(clipped / len(raw))


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
@pytest.mark.parametrize("tis", [False, True], ids=["", "tis"])
def test_gspo_loss_matches_float64_reference(beta, tis):
    """With ``tis``: one weight per sequence, exp(masked token mean of (old - sampler)): about e^1.0
    (clipped at 2), e^-0.3, e^0.2 and e^-0.9, with per-token noise that the mean keeps."""
    logps, _, ref, _, mask = _rl_case(5)
    # sequence log-ratios: above the ceiling (A > 0: clipped), below the floor (A < 0: clipped),
    # and two inside the range; per-token noise that the masked mean keeps
    shift = torch.tensor([1e-3, -1e-3, 1e-4, -1e-4])[:, None]
    noise = (torch.arange(5.0) - 2.0)[None, :] * 1e-3
    old = logps - shift - noise
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    lo, hi = 3e-4, 4e-4
    b, length = logps.shape
    shifts = -torch.tensor([1.0, -0.3, 0.2, -0.9])[:, None] + 20 * noise
    sampler = _sampler(old, mask, shifts) if tis else None
    results = []
    for token_level in (False, True):
        x = logps.clone().requires_grad_(True)
        loss, m = gspo_loss(x, old, adv, mask, eps_low=lo, eps_high=hi, beta=beta, ref_logps=ref,
                            token_level=token_level, sampler_logps=sampler, tis_cap=CAP)  # fmt: skip
        loss.backward()
        results.append((loss.item(), x.grad.clone(), m))
    lp, od, rf, mk = (t.double().tolist() for t in (logps, old, ref, mask))
    sp = sampler.double().tolist() if tis else od
    want, want_grad, clipped = 0.0, torch.zeros(b, length, dtype=torch.float64), 0
    for i in range(b):
        n = sum(mk[i])
        s = math.exp(sum((lp[i][t] - od[i][t]) * mk[i][t] for t in range(length)) / n)
        w = min(math.exp(sum((od[i][t] - sp[i][t]) for t in range(length) if mk[i][t]) / n), CAP)
        value, d = _surrogate(s, adv[i].item(), lo, hi)
        value, d = w * value, w * d  # the KL is not reweighted
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
    for _, _, m in results:
        assert ("rollout/tis_clipped" in m) == tis and (not tis or m["rollout/tis_clipped"].item() == 0.25)


@pytest.mark.parametrize("loss_fn", [grpo_loss, gspo_loss])
def test_without_engine_logps_or_cap_the_losses_are_unchanged(loss_fn):
    """No correction unless both ``sampler_logps`` and ``tis_cap`` are given: the loss, metrics and
    gradient are bitwise those of a call without them."""
    logps, old, _, adv, mask = _rl_case(2)
    sampler = _sampler(old, mask, torch.full_like(old, -1.0))  # weights e (clipped at 2) if they applied
    results = []
    for kw in ({}, {"tis_cap": CAP}, {"sampler_logps": sampler}):
        x = logps.clone().requires_grad_(True)
        loss, m = loss_fn(x, old, adv, mask, **kw)
        loss.backward()
        results.append((loss, m, x.grad))
    for loss, m, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][2])
        assert m.keys() == results[0][1].keys() and all(torch.equal(m[k], results[0][1][k]) for k in m)
    capped, _ = loss_fn(logps, old, adv, mask, sampler_logps=sampler, tis_cap=CAP)
    assert not torch.equal(capped, results[0][0])  # with both, the correction applies
