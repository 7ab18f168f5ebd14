"""Group-relative online RL: group advantages, the GRPO (DAPO, Dr. GRPO) and GSPO policy losses."""

from __future__ import annotations

import torch

from lightning_vlm.losses.steps import StepTotals, over_step, tis_weights

Metrics = dict[str, torch.Tensor]


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", batch_std: torch.Tensor | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Group-relative advantages: each reward minus its group's mean, optionally scaled.

    Args:
        rewards: (B*G,) rewards, the G samples of each prompt consecutive.
        group_size: G.
        scale: ``group`` divides by the group's standard deviation (unbiased, + 1e-4), ``batch`` by
            the standard deviation of the whole batch, ``none`` not at all (Dr. GRPO).
        batch_std: Under ``batch``, the standard deviation to divide by instead of that of ``rewards``
            (the objective passes the one over every rank's kept samples).

    Returns:
        ``(advantages (B*G,), {"reward_mean", "reward_std", "zero_std_groups"})``; the last is the
        fraction of groups whose rewards are all equal (they carry no learning signal).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (B*G,) with G={group_size}; got shape {tuple(rewards.shape)}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be group, batch or none; got {scale!r}")
    grouped = rewards.view(-1, group_size)  # (B, G)
    advantages = grouped - grouped.mean(-1, keepdim=True)
    group_std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    if scale == "group":
        advantages = advantages / (group_std + 1e-4)
    elif scale == "batch":
        advantages = advantages / ((rewards.std() if batch_std is None else batch_std) + 1e-4)
    metrics = {
        "reward_mean": rewards.detach().mean(),
        "reward_std": rewards.detach().std() if rewards.numel() > 1 else torch.zeros(()),
        "zero_std_groups": (group_std.detach() < 1e-6).float().mean(),
    }
    return advantages.reshape(-1), metrics


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, Metrics]:
    """Leave-one-out advantages (RLOO): each reward minus the mean reward of the other G - 1 samples
    of its prompt, ``r_i - (sum_j r_j - r_i) / (G - 1)``.

    Args:
        rewards: (B*G,) rewards, the G samples of each prompt consecutive.
        group_size: G, at least 2.

    Returns:
        ``((B*G,) advantages, {"baseline": mean leave-one-out baseline})``.
    """
    if group_size < 2:
        raise ValueError(
            f"rloo_advantages: the leave-one-out baseline needs group_size >= 2, got {group_size}"
        )
    r = rewards.view(-1, group_size)  # (B, G)
    baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)  # (B, G)
    return (r - baseline).reshape(-1), {"baseline": baseline.mean().detach()}


def _k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    norm: str = "dapo",
    max_completion_length: int | None = None,
    totals: StepTotals | None = None,
    sampler_logps: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO's clipped surrogate per token, with an optional k3 KL penalty to the reference.

    Per token: ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3`` with
    ``ratio = exp(logps - old_logps)``. Reduced by ``norm``: ``grpo`` (token mean per sequence, then
    mean over sequences), ``bnpo`` / ``dapo`` (sum over all tokens / token count), ``dr_grpo``
    (sum / (B * max_completion_length)).

    Args:
        logps: (B, L) policy log-probs of the completion tokens.
        old_logps: (B, L) log-probs of the policy that sampled them (``logps.detach()`` on-policy).
        advantages: (B,) one advantage per completion.
        mask: (B, L) 1 on real completion tokens.
        eps_low: Lower clip range (ratio floor ``1 - eps_low``).
        eps_high: Upper clip range (ceiling ``1 + eps_high``; DAPO's clip-higher uses e.g. 0.28).
        beta: Weight of the k3 KL to the reference (needs ``ref_logps`` when > 0).
        ref_logps: (B, L) reference log-probs.
        norm: ``grpo``, ``bnpo``, ``dapo`` or ``dr_grpo``.
        max_completion_length: The denominator's L for ``dr_grpo``.
        totals: The optimiser step's totals when it is computed in chunks: the loss is then divided
            by the step's kept tokens (``bnpo``/``dapo``) or kept sequences (the others) instead of
            this batch's own.
        sampler_logps: (B, L) the rollout engine's own log-probs, when its numerics are not the trainer's.
        tis_cap: With ``sampler_logps``, each token's surrogate (not the KL) is weighted by the detached
            ``min(exp(old_logps - sampler_logps), tis_cap)`` (``steps.tis_weights``). None: no correction.

    Returns:
        ``(loss, metrics)`` with clip fractions (``clip/low``: ratio below the floor with A < 0,
        ``clip/high``: above the ceiling with A > 0), ``kl`` (token mean of k3), ``ratio`` and, with the
        correction, ``rollout/tis_clipped`` (fraction of kept tokens whose weight the cap clipped).
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)  # (B, L)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    weights, metrics = tis_weights(old_logps, sampler_logps, mask, tis_cap)
    if weights is not None:
        per_token = per_token * weights
    tokens = mask.sum().clamp(min=1.0)
    if beta:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        kl = _k3(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / tokens).detach()
    loss = over_step(
        _reduce(per_token, mask, norm, max_completion_length), mask, totals, norm in ("bnpo", "dapo")
    )
    r = ratio.detach()
    metrics["clip/low"] = (((r < 1 - eps_low) & (a < 0)).to(mask.dtype) * mask).sum() / tokens
    metrics["clip/high"] = (((r > 1 + eps_high) & (a > 0)).to(mask.dtype) * mask).sum() / tokens
    metrics["ratio"] = (r * mask).sum() / tokens
    return loss, metrics


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, norm: str, max_len: int | None) -> torch.Tensor:
    if norm == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if norm in ("bnpo", "dapo"):
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if norm == "dr_grpo":
        if not max_len:
            raise ValueError("grpo_loss: norm 'dr_grpo' needs max_completion_length")
        return (per_token * mask).sum() / (per_token.shape[0] * max_len)
    raise ValueError(f"norm must be grpo, bnpo, dapo or dr_grpo; got {norm!r}")


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    token_level: bool = False,
    totals: StepTotals | None = None,
    sampler_logps: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO: one importance ratio per sequence, the geometric mean of its token ratios, clipped.

    ``s = exp(masked mean over tokens of (logps - old_logps))``; loss = mean over sequences of
    ``-min(s * A, clip(s, 1 - eps_low, 1 + eps_high) * A)`` (+ ``beta`` x the sequence's token-mean
    k3 KL). With ``token_level`` (GSPO-token) each token's ratio is
    ``sg(s) * pi(y_t) / sg(pi(y_t))``: the same values, but the gradient reaches each token with
    weight ``s`` instead of ``s / |y|``, and the per-token losses are averaged per sequence, which
    lets per-token advantages be used.

    Args:
        logps: (B, L) policy log-probs of the completion tokens.
        old_logps: (B, L) log-probs of the sampling policy.
        advantages: (B,) one advantage per completion.
        mask: (B, L) 1 on real completion tokens.
        eps_low: Lower clip range of the sequence ratio (GSPO paper: 3e-4).
        eps_high: Upper clip range (GSPO paper: 4e-4).
        beta: Weight of the k3 KL to the reference (0 in the paper).
        ref_logps: (B, L) reference log-probs when ``beta > 0``.
        token_level: GSPO-token instead of GSPO.
        totals: The optimiser step's totals when it is computed in chunks: the mean over sequences
            becomes the sum over this batch's sequences divided by the step's kept sequences.
        sampler_logps: (B, L) the rollout engine's own log-probs, when its numerics are not the trainer's.
        tis_cap: With ``sampler_logps``, each sequence's surrogate (not the KL) is weighted by the detached
            ``min(exp(masked token mean of (old_logps - sampler_logps)), tis_cap)``, a geometric mean like
            ``s`` (``steps.tis_weights``; GSPO-token too). None: no correction.

    Returns:
        ``(loss, metrics)`` with the clip fractions of sequences (``clip/low``, ``clip/high``),
        ``ratio`` (mean sequence ratio), ``kl`` when ``beta > 0`` and, with the correction,
        ``rollout/tis_clipped`` (fraction of kept sequences whose weight the cap clipped).
    """
    mask = mask.to(logps.dtype)
    lengths = mask.sum(-1).clamp(min=1.0)  # (B,)
    log_s = ((logps - old_logps) * mask).sum(-1) / lengths  # (B,)
    a = advantages
    if token_level:
        s = torch.exp(log_s.detach()[:, None] + logps - logps.detach())  # (B, L), value s per token
        per_token = -torch.min(s * a[:, None], torch.clamp(s, 1 - eps_low, 1 + eps_high) * a[:, None])
        per_seq = (per_token * mask).sum(-1) / lengths
    else:
        s = torch.exp(log_s)
        per_seq = -torch.min(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a)
    weights, metrics = tis_weights(old_logps, sampler_logps, mask, tis_cap, sequence=True)
    if weights is not None:
        per_seq = per_seq * weights
    if beta:
        if ref_logps is None:
            raise ValueError("gspo_loss: beta > 0 needs ref_logps")
        kl = (_k3(logps, ref_logps) * mask).sum(-1) / lengths  # (B,)
        per_seq = per_seq + beta * kl
        metrics["kl"] = kl.detach().mean()
    seq_ratio = torch.exp(log_s.detach())
    metrics["clip/low"] = ((seq_ratio < 1 - eps_low) & (a < 0)).float().mean()
    metrics["clip/high"] = ((seq_ratio > 1 + eps_high) & (a > 0)).float().mean()
    metrics["ratio"] = seq_ratio.mean()
    return over_step(per_seq.mean(), mask, totals, tokens=False), metrics
