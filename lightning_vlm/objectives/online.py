"""What the online objectives (GRPO, GSPO, PPO) share, composed into each of them.

:class:`OnlineRL` answers the RolloutCallback's questions (advantages; are old-policy or
reference log-probs needed?), scores rollouts with the policy or the reference, runs the
optimisation over a rollout (``num_iterations`` passes, ``mini_batches`` optimiser steps per pass,
``accumulation`` forwards per step, manual optimisation), and evaluates held-out prompts greedily
with the callback's reward functions.

A rollout's B x G samples are split along the sample index: a chunk is "samples k..k' of every
prompt", laid out in block order, so each forward encodes each prompt's image once (or not at all
when the image side is frozen: the rollout's features are reused).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from lightning_vlm.losses import group_advantages
from lightning_vlm.moe import capture_router_logits, load_balancing_loss, moe_layout
from lightning_vlm.rewards import combine
from lightning_vlm.rollout import Rollout, RolloutCallback, completion_mask

# Checkpoints are written after a rollout's optimiser steps, which is the state we want to save.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
# Metrics named in these sections keep their names (PPO's, as TRL and the N+ details paper name them);
# every other training metric is logged as ``train/<name>``.
SECTIONS = ("objective/", "policy/", "value/")


def rollout_callback(trainer) -> RolloutCallback:
    for callback in trainer.callbacks:
        if isinstance(callback, RolloutCallback):
            return callback
    raise ValueError(
        "online objectives need a lightning_vlm.rollout.RolloutCallback in trainer.callbacks "
        "(see zoo/tiny_qwen2vl_gspo.yaml)"
    )


class OnlineRL:
    """Rollout-side hooks and the update loop of an online objective (see the module docstring)."""

    def __init__(self, module, token_norm: bool):
        """
        Args:
            module: The objective. Its hyperparameters hold the shared settings (``num_iterations``,
                ``mini_batches``, ``accumulation``, ``max_grad_norm``, ``router_aux_coef``), documented
                in its ``__init__``; its ``need_reference`` and ``needs_old_logps`` say which extra
                log-probs a rollout needs, and its ``advantages(rollout)`` computes the advantages.
            token_norm: The loss divides by tokens (dapo/bnpo), else by sequences.
        """
        h = module.hparams
        if h.get("scale_rewards", "group") not in ("group", "batch", "none"):
            raise ValueError(f"model.scale_rewards must be group, batch or none; got {h.scale_rewards!r}")
        for name in ("num_iterations", "mini_batches", "accumulation"):
            if h[name] < 1:
                raise ValueError(f"model.{name} must be at least 1, got {h[name]}")
        self.module = module
        self.num_iterations, self.mini_batches, self.accumulation = (
            h.num_iterations,
            h.mini_batches,
            h.accumulation,
        )
        self.max_grad_norm = h.max_grad_norm
        self.token_norm = token_norm
        self.router_aux_coef = h.router_aux_coef

    # ------------------------------------------------------------------ asked by the callback
    def check_group_size(self, G: int) -> None:
        least = self.module.min_group_size
        if G < least:
            raise ValueError(
                f"rollout.num_generations must be at least {least} for {type(self.module).__name__}, got {G}"
                + (" (advantages compare the samples of a group)" if least > 1 else "")
            )
        if G % (self.mini_batches * self.accumulation):
            raise ValueError(
                f"rollout.num_generations ({G}) must be divisible by model.mini_batches x model.accumulation "
                f"({self.mini_batches} x {self.accumulation}): each forward takes the same samples of every prompt"
            )

    def needs(self) -> dict[str, bool]:
        # On-policy (one optimiser step per rollout) the ratio is exactly 1: no old-policy forward,
        # unless the objective uses the sampling policy's log-probs elsewhere (PPO's KL reward).
        m = self.module
        old = self.num_iterations * self.mini_batches > 1 or m.needs_old_logps
        return {"old_logps": old, "ref_logps": m.need_reference}

    def advantages(self, rollout: Rollout) -> torch.Tensor:
        """(B*G,) or (B*G, N) advantages, from the objective (after the old/reference log-probs)."""
        return self.module.advantages(rollout)

    def chunks(self, G: int) -> list[list[list[int]]]:
        """Sample indices per forward, grouped per optimiser step: ``mini_batches`` x ``accumulation``."""
        size = G // (self.mini_batches * self.accumulation)
        parts = [list(range(s, s + size)) for s in range(0, G, size)]
        return [parts[m * self.accumulation : (m + 1) * self.accumulation] for m in range(self.mini_batches)]

    @torch.no_grad()
    def logps(self, rollout: Rollout, model=None) -> torch.Tensor:
        """(B*G, N) completion log-probs under the policy (or ``model``, the reference), no gradient."""
        out = torch.zeros(
            rollout.completion_ids.shape, dtype=torch.float32, device=rollout.completion_ids.device
        )
        for step in self.chunks(rollout.group_size):
            for samples in step:
                logps, _, _ = self.forward(rollout, samples, model)
                out[rollout.rows_of(samples)] = logps
        return out

    # ------------------------------------------------------------------ forward and update
    def forward(self, rollout: Rollout, samples: list[int], model=None, entropy: bool = False):
        """(log-probs (R, N), entropies or None, router aux loss or None) for ``samples`` of every prompt."""
        bb = self.module.backbone
        seq = rollout.sequences(samples)
        # The reference shares the policy's image features only when nothing on the image side trains.
        features = rollout.features if (model is None or bb.vision_is_frozen) else None
        args = (
            seq["input_ids"],
            seq["attention_mask"],
            seq["vision"],
            seq["target_mask"],
            model,
            seq["copies"],
            features,
        )
        kw = {"entropy": entropy, "temperature": rollout.temperature}
        aux = None
        if self.router_aux_coef and model is None and torch.is_grad_enabled():
            with capture_router_logits(bb.model) as logits:
                out = bb.token_logps(*args, **kw)
            experts, top_k = moe_layout(bb.model)
            aux = load_balancing_loss(logits, experts, top_k, seq["attention_mask"])
        else:
            out = bb.token_logps(*args, **kw)
        logps, ent = out if entropy else (out, None)
        P = seq["prompt_length"]
        return logps[:, P:], (ent[:, P:] if ent is not None else None), aux

    def train(self, rollouts: list[Rollout], loss_fn: LossFn) -> None:
        """``num_iterations`` passes over the rollouts; each pass takes ``mini_batches`` optimiser steps."""
        m = self.module
        opt, sched = m.optimizers(), m.lr_schedulers()
        G = rollouts[0].group_size
        history: dict[str, list[torch.Tensor]] = {}
        for _ in range(self.num_iterations):
            for step in self.chunks(G):
                total = self._denominator(rollouts, step)
                # The step's aux loss is the mean over the forwards that run (chunks with kept samples).
                forwards = sum(bool(r.keep[r.rows_of(c)].any()) for r in rollouts for c in step)
                losses = []
                for r in rollouts:
                    for samples in step:
                        loss, metrics = self._chunk_loss(r, samples, loss_fn, total, forwards)
                        if loss is not None:
                            m.manual_backward(loss)
                            losses.append(loss.detach())
                        for k, v in metrics.items():
                            history.setdefault(k, []).append(v)
                step_loss = torch.stack(losses).sum() if losses else torch.zeros((), device=m.device)
                history.setdefault("loss", []).append(step_loss)
                if m.guard(step_loss) is not None and losses:
                    if self.max_grad_norm:
                        m.clip_gradients(
                            opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
                        )
                    opt.step()
                opt.zero_grad()
                if sched is not None:
                    sched.step()
        batch_size = rollouts[0].num_prompts
        for key, values in history.items():
            m.log(
                key if key.startswith(SECTIONS) else f"train/{key}",
                torch.stack(values).float().mean(),
                on_step=True,
                batch_size=batch_size,
                prog_bar=key == "loss",
            )

    def _denominator(self, rollouts: list[Rollout], step: list[list[int]]) -> torch.Tensor:
        """Kept tokens (token norms) or kept sequences of this optimiser step, summed over ranks."""
        total = torch.zeros((), device=rollouts[0].rewards.device)
        for r in rollouts:
            for samples in step:
                rows = r.rows_of(samples)
                keep = r.keep[rows].float()
                total += (r.completion_mask[rows].sum(1) * keep).sum() if self.token_norm else keep.sum()
        trainer = self.module._trainer
        if trainer is not None and trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        return total.clamp(min=1.0)

    def _chunk_loss(
        self, r: Rollout, samples: list[int], loss_fn: LossFn, total: torch.Tensor, forwards: int
    ):
        rows = r.rows_of(samples)
        keep = r.keep[rows]
        world = self.module._trainer.world_size if self.module._trainer is not None else 1
        if not keep.any() and world == 1:  # with several ranks, every rank runs every forward and backward
            return None, {}
        with torch.set_grad_enabled(not r.policy_frozen):  # frozen: no policy graph, no router loss
            logps, ent, aux = self.forward(r, samples, entropy=True)
        mask = r.completion_mask[rows] * keep[:, None]  # (R, N)
        old = r.old_logps[rows] if r.old_logps is not None else logps.detach()
        ref = r.ref_logps[rows] if r.ref_logps is not None else None
        adv = r.advantages[rows]  # (R,) or, for per-token advantages, (R, N)
        adv = adv * keep.view(-1, *[1] * (adv.dim() - 1))
        loss, metrics = loss_fn(logps, old, adv, mask, ref, r, samples)
        # Rescale the chunk's own normalisation to the step's (all chunks, all ranks), so the update does
        # not depend on how the step is split into forwards or devices; DDP averages over ranks.
        own = (
            mask.sum().clamp(min=1.0)
            if self.token_norm
            else torch.tensor(float(len(rows)), device=mask.device)
        )
        loss = loss * own * world / total
        tokens = mask.sum().clamp(min=1.0)
        metrics = {**metrics, "policy/entropy": (ent * mask).sum() / tokens}
        if aux is not None:
            metrics["router_aux_loss"] = aux.detach()
            loss = loss + self.router_aux_coef * aux / forwards
        return loss, metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batch: dict, stage: str | None, max_new_tokens: int | None = None) -> list[dict]:
        """Greedy answers to held-out prompts, scored by the rollout's reward functions; logs
        ``<stage>/reward`` and ``<stage>/rewards/<function>``."""
        m = self.module
        callback = rollout_callback(m.trainer)
        ids = m.backbone.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["vision"],
            max_new_tokens=max_new_tokens or callback.sampling["max_new_tokens"],
        )
        texts = m.backbone.decode(ids)
        columns = dict(batch["columns"])
        # As in the rollout: each answer's tokens up to and including its EOS, not the padding after it.
        mask, _ = completion_mask(ids, m.backbone.tokenizer.eos_token_id)
        columns["completion_ids"] = [row[keep.bool()].tolist() for row, keep in zip(ids, mask, strict=True)]
        columns["group"] = list(range(len(texts)))
        totals, per_fn = combine(callback.rewards, callback.reward_weights, batch["prompts"], texts, columns)
        n = len(texts)
        rows = [
            {"row": row, "completion": t, "reward": tot, **{k: v[i] for k, v in per_fn.items()}}
            for i, (row, t, tot) in enumerate(zip(batch["rows"], texts, totals, strict=True))
        ]
        if stage is None:  # predict: no logging
            return rows
        m.log(f"{stage}/reward", sum(totals) / n, on_epoch=True, batch_size=n, sync_dist=True, prog_bar=True)
        for name, values in per_fn.items():
            ok = [float(v) for v in values if v is not None]
            if ok:
                m.log(
                    f"{stage}/rewards/{name}",
                    sum(ok) / len(ok),
                    on_epoch=True,
                    batch_size=len(ok),
                    sync_dist=True,
                    prog_bar=name == "accuracy",
                )
        return rows


class OnlineSteps:
    """The Lightning steps every online objective shares, mixed in beside :class:`VLMObjective`
    (``class GRPO(OnlineSteps, VLMObjective)``). The objective provides ``self.online`` (an
    :class:`OnlineRL`) and ``policy_loss(logps, old_logps, advantages, mask, ref_logps, rollout, samples)``
    (``samples``: the sample indices of every prompt in this forward, see :meth:`Rollout.rows_of`).
    Group-based objectives keep the defaults below; PPO overrides them."""

    min_group_size = 2  # group-relative advantages need at least two samples per prompt
    needs_old_logps = False  # beyond the ratio: True when the advantages use the sampling policy's log-probs

    def advantages(self, rollout: Rollout) -> torch.Tensor:
        """(B*G,) group-relative advantages of the rollout's rewards (``scale_rewards``)."""
        return group_advantages(rollout.rewards, rollout.group_size, scale=self.hparams.scale_rewards)[0]

    def on_fit_start(self) -> None:
        rollout_callback(self.trainer)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self.online.train(batch["rollouts"], self.policy_loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.online.evaluate(batch, "val", self.hparams.eval_max_new_tokens)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.online.evaluate(batch, "test", self.hparams.eval_max_new_tokens)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return self.online.evaluate(batch, None, self.hparams.eval_max_new_tokens)
