"""Pairwise preference losses: DPO, IPO, hinge, MPO's BCO term and the Bradley-Terry reward model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


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
    """DPO (sigmoid): ``-logsigmoid(beta * ((c - rc) - (r - rr)))``, mean over pairs. Returns ``(loss,
    metrics)`` with rewards/{chosen,rejected,margins,accuracies} and logps/{chosen,rejected}.

    Args:
        chosen_logps: (B,) policy log-probs of the chosen completions (sums over their tokens).
        rejected_logps: (B,) the same for the rejected completions.
        ref_chosen_logps: (B,) reference log-probs of the chosen completions.
        ref_rejected_logps: (B,) reference log-probs of the rejected completions.
        beta: Strength of the implicit KL constraint to the reference.
        label_smoothing: Probability that a pair's label is flipped (conservative DPO, cDPO); 0 is plain DPO.
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
    Returns ``(loss, metrics)`` with accuracy (rc > rr), margin (mean rc - rr) and the mean scores.

    Args:
        chosen_rewards: (B,) scores of the chosen responses.
        rejected_rewards: (B,) scores of the rejected responses.
        margin: (B,) optional per-pair margin the chosen score must exceed the rejected one by
            (Llama 2's preference-strength margin).
        center_coef: Optional weight of ``mean((rc + rr)**2)``, which keeps scores centred on 0
            (Eisenstein et al. 2023), so a rollout can use them without a baseline.
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
