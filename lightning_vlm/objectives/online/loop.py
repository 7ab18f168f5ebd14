"""The update loop over a rollout, shared by every online objective (see ``online.base``).

Functions of the objective (an :class:`~lightning_vlm.objectives.online.base.OnlineObjective`):
its backbone, its ``settings`` (``OnlineSettings``) and its ``policy_loss`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_vlm.losses import StepTotals
from lightning_vlm.model.moe import capture_router_logits, load_balancing_loss, moe_layout
from lightning_vlm.model.prefix import fallback_reason, shared_prefix_aux, shared_prefix_logps, split
from lightning_vlm.rollout.rollout import Rollout

# Metrics named in these sections keep their names (PPO's, as TRL and the N+ details paper name them, and
# the sampler mismatch's ``rollout/*``); every other training metric is logged as ``train/<name>``.
SECTIONS = ("objective/", "policy/", "value/", "rollout/")


@dataclass
class Chunk:
    """One forward's worth of a rollout, as :meth:`OnlineObjective.policy_loss` sees it. R rows."""

    logps: torch.Tensor  # (R, N) the policy's, with gradient
    old_logps: torch.Tensor  # (R, N) the sampling policy's (``logps.detach()`` on-policy)
    ref_logps: torch.Tensor | None  # (R, N) or None
    advantages: torch.Tensor  # (R,) or (R, N); 0 on dropped samples
    mask: torch.Tensor  # (R, N) kept completion tokens
    totals: StepTotals  # what the whole optimiser step divides by
    rollout: Rollout
    samples: list[int]  # sample indices of every prompt in this chunk
    rows: torch.Tensor  # (R,) rollout rows (``rollout.rows_of(samples)``)
    sampler_logps: torch.Tensor | None = None  # (R, N) the engine's own (``rollout.engine_logps``), or None
    tis_cap: float | None = None  # truncated importance sampling's cap (``OnlineSettings.tis_cap``)


def chunks(objective, G: int) -> list[list[list[int]]]:
    """Sample indices per forward, grouped per optimiser step: ``mini_batches`` x ``accumulation``."""
    s = objective.settings
    size = G // (s.mini_batches * s.accumulation)
    parts = [list(range(k, k + size)) for k in range(0, G, size)]
    return [parts[m * s.accumulation : (m + 1) * s.accumulation] for m in range(s.mini_batches)]


@torch.no_grad()
def logps(objective, rollout: Rollout, model=None) -> torch.Tensor:
    """(B*G, N) completion log-probs under the policy (or ``model``, the reference), no gradient."""
    out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=rollout.completion_ids.device)
    for step in chunks(objective, rollout.group_size):
        for samples in step:
            out[rollout.rows_of(samples)] = forward(objective, rollout, samples, model)[0]
    return out


def forward(objective, rollout: Rollout, samples: list[int], model=None, entropy: bool = False):
    """(log-probs (R, N), entropies or None, router aux loss or None) for ``samples`` of every prompt."""
    bb = objective.backbone
    # The rollout's features (no gradient, the sampling weights; see Rollout) serve every forward when
    # nothing on the image side trains, else only the policy's no-grad passes until ``train`` drops them.
    share = bb.vision_is_frozen or (model is None and not torch.is_grad_enabled())
    features = rollout.features if share else None
    seq = rollout.sequences(samples)
    prefix = shared_prefix(objective, seq["copies"])
    T = rollout.temperature

    def run():
        if prefix:
            return shared_prefix_logps(
                bb, *split(seq), model=model, features=features, entropy=entropy, temperature=T
            )
        inputs = (seq["input_ids"], seq["attention_mask"], seq["vision"], seq["target_mask"])
        out = bb.token_logps(*inputs, model, seq["copies"], features, entropy=entropy, temperature=T)
        lp, ent = out if entropy else (out, None)
        P = seq["prompt_length"]
        return lp[:, P:], (ent[:, P:] if ent is not None else None)

    if not (objective.settings.router_aux_coef and model is None and torch.is_grad_enabled()):
        return (*run(), None)
    with capture_router_logits(bb.model) as router_logits:
        lp, ent = run()
    layout = moe_layout(bb.model)
    if layout is None:
        raise ValueError("model.loop.router_aux_coef > 0 needs a Mixture-of-Experts backbone")
    if prefix:  # the two passes' router logits: (prompt mask, completion mask)
        aux = shared_prefix_aux(router_logits, *split(seq)[1:4:2], *layout)
    else:
        aux = load_balancing_loss(router_logits, *layout, seq["attention_mask"])
    return lp, ent, aux


def shared_prefix(objective, copies: int, backbone=None) -> bool:
    """``OnlineSettings.shared_prefix`` applies to ``backbone`` (the policy's by default): on, several
    samples per prompt, and no fallback reason (warned once per objective)."""
    if not objective.settings.shared_prefix or copies < 2:
        return False
    why = fallback_reason(backbone or objective.backbone)
    if why is not None and not getattr(objective, "_prefix_warned", False):
        objective._prefix_warned = True
        rank_zero_warn(f"model.loop.shared_prefix is on but prompts are scored once per sample: {why}")
    return why is None


def train(objective, rollouts: list[Rollout]) -> None:
    """``num_iterations`` passes over the rollouts; each pass takes ``mini_batches`` optimiser steps."""
    m, s = objective, objective.settings
    opt, sched = m.optimizers(), m.lr_schedulers()
    if not m.backbone.vision_is_frozen:  # a trained image side: the features go stale with the first step
        for r in rollouts:
            r.features = None
    history: dict[str, list[torch.Tensor]] = {}
    for _ in range(s.num_iterations):
        for step in chunks(m, rollouts[0].group_size):
            totals = step_totals(m, rollouts, step)
            # The step's aux loss is the mean over the forwards that run (chunks with kept samples).
            forwards = sum(bool(r.keep[r.rows_of(c)].any()) for r in rollouts for c in step)
            losses = []
            for r in rollouts:
                for samples in step:
                    loss, metrics = chunk_loss(m, r, samples, totals, forwards)
                    if loss is not None:
                        m.manual_backward(loss)
                        losses.append(loss.detach())
                    for k, v in metrics.items():
                        history.setdefault(k, []).append(v)
            step_loss = torch.stack(losses).sum() if losses else torch.zeros((), device=m.device)
            history.setdefault("loss", []).append(step_loss)
            if m.guard(step_loss) is not None and losses:
                history.setdefault("grad_norm", []).append(m.grad_norm())  # before clipping
                if s.max_grad_norm:
                    m.clip_gradients(opt, gradient_clip_val=s.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()
    gap = history.pop("logp_gap", None)
    if gap:  # over every kept token of the step (each pass sees the same values)
        g = torch.stack(gap)  # (chunks, 3): sum, tokens, max
        history["rollout/logp_gap"] = [g[:, 0].sum() / g[:, 1].sum().clamp(min=1.0)]
        history["rollout/logp_gap_max"] = [g[:, 2].max()]
    batch_size = rollouts[0].num_prompts
    for key, values in history.items():
        m.log(
            key if key.startswith(SECTIONS) else f"train/{key}",
            torch.stack(values).float().mean(),
            on_step=True,
            batch_size=batch_size,
            prog_bar=key == "loss",
        )


def step_totals(objective, rollouts: list[Rollout], step: list[list[int]]) -> StepTotals:
    """Kept tokens and kept sequences of one optimiser step over every rank, per rank (DDP averages
    the ranks' gradients, so each rank divides by the global total over the world size)."""
    device = rollouts[0].rewards.device
    tokens, sequences = torch.zeros((), device=device), torch.zeros((), device=device)
    for r in rollouts:
        for samples in step:
            rows = r.rows_of(samples)
            keep = r.keep[rows].float()
            tokens += (r.completion_mask[rows].sum(1) * keep).sum()
            sequences += keep.sum()
    trainer, world = objective._trainer, _world(objective)
    if world > 1:
        tokens = trainer.strategy.reduce(tokens, reduce_op="sum")
        sequences = trainer.strategy.reduce(sequences, reduce_op="sum")
    return StepTotals(tokens=tokens.clamp(min=1.0) / world, sequences=sequences.clamp(min=1.0) / world)


def chunk_loss(objective, r: Rollout, samples: list[int], totals: StepTotals, forwards: int):
    rows = r.rows_of(samples)
    keep = r.keep[rows]
    if not keep.any() and _world(objective) == 1:  # with several ranks, every rank runs every forward
        return None, {}
    with torch.set_grad_enabled(not r.policy_frozen):  # frozen: no policy graph, no router loss
        lp, ent, aux = forward(objective, r, samples, entropy=True)
    mask = r.completion_mask[rows] * keep[:, None]  # (R, N)
    assert r.advantages is not None, "on_rollout computes the advantages"
    adv = r.advantages[rows]  # (R,) or, for per-token advantages, (R, N)
    chunk = Chunk(
        logps=lp,
        old_logps=r.old_logps[rows] if r.old_logps is not None else lp.detach(),
        ref_logps=r.ref_logps[rows] if r.ref_logps is not None else None,
        advantages=adv * keep.view(-1, *[1] * (adv.dim() - 1)),
        mask=mask,
        totals=totals,
        rollout=r,
        samples=samples,
        rows=rows,
        sampler_logps=r.engine_logps[rows].to(lp) if r.engine_logps is not None else None,
        tis_cap=objective.settings.tis_cap,
    )
    loss, metrics = objective.policy_loss(chunk)
    tokens = mask.sum().clamp(min=1.0)
    metrics = {**metrics, "policy/entropy": (ent * mask).sum() / tokens}
    if chunk.sampler_logps is not None:  # the engine's numerics against the trainer's (sampling weights)
        gap = torch.where(mask.bool(), (chunk.sampler_logps - chunk.old_logps).abs(), 0.0)  # (R, N)
        metrics["logp_gap"] = torch.stack([gap.sum(), mask.sum().to(gap), gap.max()])
    if aux is not None and keep.any() and forwards:  # chunks without kept samples add no aux
        metrics["router_aux_loss"] = aux.detach()
        loss = loss + objective.settings.router_aux_coef * aux / forwards
    return loss, metrics


def _world(objective) -> int:
    trainer = objective._trainer
    return trainer.world_size if trainer is not None else 1
