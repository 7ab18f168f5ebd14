"""PPO's maths: KL-shaped per-token rewards, GAE, whitening, the clipped policy and value losses.

Same contract as the rest of :mod:`lightning_vlm.losses`: tensors in, ``(loss, metrics)`` out for the
losses; shapes (B, L) over completion tokens, ``mask`` 1 on real tokens (a prefix of each row).
"""

from __future__ import annotations

import torch

from lightning_vlm.losses.steps import StepTotals, over_step, tis_weights

Metrics = dict[str, torch.Tensor]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def kl_penalty_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float = 0.05,
    kl: str = "k1",
) -> tuple[torch.Tensor, Metrics]:
    """Per-token rewards of RLHF-style PPO: ``-kl_coef * KL_t`` on every token, plus the sequence's score
    on its last real token.

    Args:
        scores: (B,) reward-model score of each completion.
        logps: (B, L) log-probs of the sampling policy.
        ref_logps: (B, L) log-probs of the reference.
        mask: (B, L) 1 on real completion tokens.
        kl_coef: Weight of the per-token KL.
        kl: ``k1`` (``logp - ref``, unbiased, can be negative) or ``k3``
            (``exp(ref - logp) - (ref - logp) - 1``, non-negative, lower variance).

    Returns:
        ``((B, L) rewards, {"kl", "scores", "non_score_reward"})``: ``kl`` is the sequence KL (sum over
        tokens) averaged over the batch, ``non_score_reward`` the sum of the KL terms averaged likewise.
    """
    mask = mask.to(logps.dtype)
    d = logps - ref_logps
    if kl == "k1":
        per_token = d
    elif kl == "k3":
        per_token = torch.exp(-d) + d - 1
    else:
        raise ValueError(f"kl must be k1 or k3; got {kl!r}")
    per_token = per_token * mask
    non_score = -kl_coef * per_token  # (B, L)
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    rewards = non_score.clone()
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype) * (mask.sum(-1) > 0)
    metrics = {
        "kl": per_token.sum(-1).mean().detach(),
        "scores": scores.detach().float().mean(),
        "non_score_reward": non_score.sum(-1).mean().detach(),
    }
    return rewards, metrics


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` = 0 after the last real token, and
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns ``R_t = A_t + V_t``.

    Args:
        rewards: (B, L) per-token rewards.
        values: (B, L) value estimates (no gradient is taken through them).
        mask: (B, L) 1 on real tokens (a prefix of each row).
        gamma: Discount.
        lam: GAE's bias-variance trade-off (1: Monte-Carlo returns minus V; 0: one-step TD).

    Returns:
        ``(advantages, returns)``, both (B, L), 0 on padding.
    """
    mask = mask.to(values.dtype)
    values, rewards = values.detach() * mask, rewards.detach() * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (std unbiased, + 1e-8); with ``shift_mean=False`` the
    mean is added back (scale only). Padding stays 0."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1.0)
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    totals: StepTotals | None = None,
    sampler_logps: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped policy loss plus its clipped value loss, token means over the mask.

    ``pg = max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))``;
    ``vf = 0.5 * max((V - R)^2, (clip(V, V_old - cv, V_old + cv) - R)^2)``;
    ``loss = mean(pg) + vf_coef * mean(vf)``.

    Args:
        logps: (B, L) policy log-probs (with gradient).
        old_logps: (B, L) log-probs of the policy that sampled the tokens.
        advantages: (B, L) per-token advantages (usually GAE, whitened).
        values: (B, L) value predictions (with gradient).
        old_values: (B, L) value predictions at sampling time.
        returns: (B, L) GAE returns.
        mask: (B, L) 1 on real completion tokens.
        cliprange: Policy ratio clip c.
        cliprange_value: Value clip cv around the old values.
        vf_coef: Weight of the value loss.
        totals: The optimiser step's totals when it is computed in chunks: both token means are then
            taken over the step's kept tokens.
        sampler_logps: (B, L) the rollout engine's own log-probs, when its numerics are not the trainer's.
        tis_cap: With ``sampler_logps``, each token's ``pg`` (not ``vf``) is weighted by the detached
            ``min(exp(old_logps - sampler_logps), tis_cap)`` (``steps.tis_weights``). None: no correction.

    Returns:
        ``(loss, metrics)`` with ``policy/loss``, ``policy/clipfrac`` (tokens where the clipped term is
        the max), ``policy/approxkl`` (``0.5 * mean((logp - old)^2)``), ``policy/ratio``, ``value/loss``,
        ``value/clipfrac`` and, with the correction, ``rollout/tis_clipped`` (fraction of kept tokens
        whose weight the cap clipped).
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    weights, tis = tis_weights(old_logps, sampler_logps, mask, tis_cap)
    pg = torch.max(pg1, pg2)
    pg_loss = _masked_mean(pg if weights is None else pg * weights, mask)
    clipped_values = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    vf1 = (values - returns) ** 2
    vf2 = (clipped_values - returns) ** 2
    vf_loss = 0.5 * _masked_mean(torch.max(vf1, vf2), mask)
    loss = over_step(pg_loss + vf_coef * vf_loss, mask, totals, tokens=True)
    d = (logps - old_logps).detach()
    metrics = {
        "policy/loss": pg_loss.detach(),
        "policy/clipfrac": _masked_mean((pg2 > pg1).to(mask.dtype), mask).detach(),
        "policy/approxkl": 0.5 * _masked_mean(d**2, mask),
        "policy/ratio": _masked_mean(ratio.detach(), mask),
        "value/loss": vf_loss.detach(),
        "value/clipfrac": _masked_mean((vf2 > vf1).to(mask.dtype), mask).detach(),
        **tis,
    }
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens: 1 is a perfect critic, 0 one
    no better than a constant, negative one worse (NaN when the returns do not vary)."""
    mask = mask.to(values.dtype)

    def var(x: torch.Tensor) -> torch.Tensor:
        mean = _masked_mean(x, mask)
        return _masked_mean((x - mean) ** 2, mask)

    v = var(returns)
    return torch.where(v > 0, 1 - var(returns - values) / v, torch.full_like(v, float("nan"))).detach()
