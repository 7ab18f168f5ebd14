"""Loss functions: pure tensor maths, one function per loss.

Contract (shared/DESIGN.md): each function returns ``(loss, metrics)``, ``loss`` a scalar tensor
and ``metrics`` a dict of detached tensors. Shapes: B sequences, L completion tokens; ``mask`` is
1 on real completion tokens; sequence log-probs are sums over completion tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def sft_loss(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Token-mean negative log-likelihood over the target tokens of the whole batch.

    Args:
        logps: (B, L) log-probability of each target token.
        mask: (B, L) 1 on tokens that count.

    Returns:
        ``(loss, {"nll": loss, "tokens": count})``; the loss is 0 (with a gradient path) when the
        mask is empty.
    """
    mask = mask.to(logps.dtype)
    tokens = mask.sum()
    loss = -(logps * mask).sum() / tokens.clamp(min=1.0)
    return loss, {"nll": loss.detach(), "tokens": tokens.detach()}


def _implicit_rewards(c, r, rc, rr, beta):
    """DPO's implicit rewards beta * log(pi / pi_ref) of each chosen and rejected sequence."""
    return beta * (c - rc), beta * (r - rr)


def _preference_metrics(c, r, chosen_rewards, rejected_rewards) -> Metrics:
    return {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach().mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": c.detach().mean(),
        "logps/rejected": r.detach().mean(),
    }


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """DPO (sigmoid): ``-logsigmoid(beta * ((c - rc) - (r - rr)))``, mean over pairs.

    Args:
        chosen_logps: (B,) policy log-probs of the chosen completions (sums over their tokens).
        rejected_logps: (B,) the same for the rejected completions.
        ref_chosen_logps: (B,) reference log-probs of the chosen completions.
        ref_rejected_logps: (B,) reference log-probs of the rejected completions.
        beta: Strength of the implicit KL constraint to the reference.
        label_smoothing: Probability that a pair's label is flipped (conservative DPO, cDPO);
            0 is plain DPO.

    Returns:
        ``(loss, metrics)`` with rewards/{chosen,rejected,margins,accuracies} and logps/{chosen,rejected}.
    """
    cr, rr_ = _implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    z = cr - rr_  # (B,)
    losses = -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return losses.mean(), _preference_metrics(chosen_logps, rejected_logps, cr, rr_)


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023): ``((c - rc) - (r - rr) - 1 / (2 beta))**2``, mean over pairs.

    The IPO paper regresses the log-ratio gap of *length-normalised* log-probs to ``1/(2 beta)``;
    the DPO objective passes token means here when ``loss_type: ipo``. Rewards in the metrics are
    ``beta * (logps - ref)`` as for DPO.
    """
    cr, rr_ = _implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    gap = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)  # (B,)
    loss = ((gap - 1 / (2 * beta)) ** 2).mean()
    return loss, _preference_metrics(chosen_logps, rejected_logps, cr, rr_)


def hinge_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Hinge (SLiC-HF, Zhao et al. 2023): ``relu(1 - beta * ((c - rc) - (r - rr)))``, mean over pairs."""
    cr, rr_ = _implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    loss = torch.relu(1 - (cr - rr_)).mean()
    return loss, _preference_metrics(chosen_logps, rejected_logps, cr, rr_)


def bco_pair_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    delta: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """BCO quality term of MPO: each response is judged on its own against the reward shift ``delta``.

    ``-logsigmoid(beta*(c - rc) - delta) - logsigmoid(-(beta*(r - rr) - delta))``, mean over pairs.
    ``delta`` is a constant here (no gradient); MPO keeps it as the running mean of the batch-mean
    reward. Metrics add ``rewards/batch_mean``: the mean of the 2B rewards, which updates delta.
    """
    cr, rr_ = _implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    delta = torch.as_tensor(delta, dtype=cr.dtype, device=cr.device).detach()
    losses = -F.logsigmoid(cr - delta) - F.logsigmoid(-(rr_ - delta))
    metrics = _preference_metrics(chosen_logps, rejected_logps, cr, rr_)
    metrics["rewards/batch_mean"] = torch.cat([cr, rr_]).detach().mean()
    return losses.mean(), metrics


def reward_model_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry loss of a scalar reward model: ``-logsigmoid(rc - rr - margin)``, mean over pairs.

    Args:
        chosen_rewards: (B,) scores of the chosen responses.
        rejected_rewards: (B,) scores of the rejected responses.
        margin: (B,) optional per-pair margin the chosen score must exceed the rejected one by
            (Llama 2's preference-strength margin).
        center_coef: Optional weight of ``mean((rc + rr)**2)``, which keeps scores centred on 0
            (Eisenstein et al. 2023), so a rollout can use them without a baseline.

    Returns:
        ``(loss, metrics)`` with accuracy (rc > rr), margin (mean rc - rr) and the mean scores.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    loss = -F.logsigmoid(diff - margin if margin is not None else diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    metrics = {
        "accuracy": (diff > 0).float().mean().detach(),
        "margin": diff.detach().mean(),
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
    }
    return loss, metrics


# ---------------------------------------------------------------- online RL (GRPO, GSPO)
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group"
) -> tuple[torch.Tensor, Metrics]:
    """Group-relative advantages: each reward minus its group's mean, optionally scaled.

    Args:
        rewards: (B*G,) rewards, the G samples of each prompt consecutive.
        group_size: G.
        scale: ``group`` divides by the group's standard deviation (unbiased, + 1e-4), ``batch`` by
            the standard deviation of the whole batch, ``none`` not at all (Dr. GRPO).

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
        advantages = advantages / (rewards.std() + 1e-4)
    metrics = {
        "reward_mean": rewards.detach().mean(),
        "reward_std": rewards.detach().std() if rewards.numel() > 1 else torch.zeros(()),
        "zero_std_groups": (group_std.detach() < 1e-6).float().mean(),
    }
    return advantages.reshape(-1), metrics


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

    Returns:
        ``(loss, metrics)`` with clip fractions (``clip/low``: ratio below the floor with A < 0,
        ``clip/high``: above the ceiling with A > 0), ``kl`` (token mean of k3) and ``ratio``.
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)  # (B, L)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    metrics: Metrics = {}
    tokens = mask.sum().clamp(min=1.0)
    if beta:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        kl = _k3(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / tokens).detach()
    loss = _reduce(per_token, mask, norm, max_completion_length)
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

    Returns:
        ``(loss, metrics)`` with the clip fractions of sequences (``clip/low``, ``clip/high``),
        ``ratio`` (mean sequence ratio) and ``kl`` when ``beta > 0``.
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
    metrics: Metrics = {}
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
    return per_seq.mean(), metrics


from lightning_vlm.losses.ppo import (  # noqa: E402
    explained_variance,
    gae,
    kl_penalty_rewards,
    masked_whiten,
    ppo_losses,
)

__all__ = [
    "bco_pair_loss",
    "dpo_loss",
    "explained_variance",
    "gae",
    "group_advantages",
    "grpo_loss",
    "gspo_loss",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty_rewards",
    "masked_whiten",
    "ppo_losses",
    "reward_model_loss",
    "sft_loss",
]
