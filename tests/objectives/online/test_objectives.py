"""Every online objective the package exports that builds from a backbone alone (discovered, not
listed: a new one-file objective is tested here without a new test file): its rollouts get only the
log-probs they need, the loop's loss is its ``policy_loss`` whatever the accumulation, training moves
the trainable weights only and keeps the reference, held-out batches log the greedy rewards, and bad
settings fail clearly."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_vlm import LoraSettings
from lightning_vlm.data import PromptDataModule
from lightning_vlm.objectives import GRPO, GSPO, PPO, RLOO
from lightning_vlm.objectives.online import Chunk, RolloutNeeds, loop
from tests.helpers.online import (
    B,
    G,
    Spy,
    bind,
    build,
    count_calls,
    even_prompts,
    fit,
    kl_kwargs,
    online_objectives,
    plain_logps,
    prepared_rollout,
    prompt_batch,
    prompt_dm,
    rollout_callback,
    snapshot,
    token_reward,
    train_manually,
    with_kl,
)

ONLINE = online_objectives()
objective = pytest.mark.parametrize("cls", ONLINE, ids=[cls.__name__ for cls in ONLINE])


def test_discovery_finds_every_online_objective_built_from_a_backbone():
    assert {GRPO, GSPO, RLOO} <= set(ONLINE) and PPO not in ONLINE  # PPO needs a critic: test_ppo.py
    for cls in ONLINE:
        assert kl_kwargs(cls) is None or build(cls, **kl_kwargs(cls)).needs().reference, cls


# ---------------------------------------------------------------- no work that changes nothing
@objective
def test_a_rollout_gets_only_the_log_probs_it_needs(cls, synthetic_dir):
    """On-policy (one optimiser step per rollout) the ratio is exactly 1: no old-policy forward unless
    the objective declares it needs the sampling policy's log-probs; no reference kept or run without a
    KL. Off-policy (several steps per rollout) the old log-probs are the policy's before any update."""
    cases = [({}, None), ({}, {"mini_batches": 2}), ({}, {"num_iterations": 2})]
    if kl_kwargs(cls) is not None:
        cases.append((kl_kwargs(cls), None))
    batch = None
    for kw, settings in cases:
        module = build(cls, loop=settings, **kw)
        needs = module.needs()
        if not kw:  # without a KL, nothing but the policy's own log-probs
            assert needs == RolloutNeeds(min_group_size=needs.min_group_size), needs
        assert (module.backbone._reference is not None) == needs.reference, (kw, settings)
        batch = batch or prompt_batch(prompt_dm(module.backbone.processor, synthetic_dir))
        r = bind(rollout_callback(), module).sample(module, batch)
        calls = count_calls(module)
        module.on_rollout([r], "train")
        old = needs.old_policy or settings is not None
        assert (r.old_logps is not None) == old, (kw, settings)
        assert (r.ref_logps is not None) == needs.reference, (kw, settings)
        forwards = len(loop.chunks(module, G)) * module.settings.accumulation  # per pass over the rollout
        # Each forward (shared prefix): the B prompts once, then their samples' completions.
        prompts = [c for c in calls["lm"] if c[:2] == tuple(r.prompt_ids.shape)]
        assert len(prompts) == forwards * (old + needs.reference), (kw, settings)
        assert len(calls["lm"]) == 2 * len(prompts), (kw, settings)
        assert not any(grad for _, _, grad in calls["lm"])
        if old:
            assert torch.equal(r.old_logps, loop.logps(module, r))  # nothing was updated yet
        assert r.advantages is not None and r.advantages.shape[0] == B * G
        (kept,) = module._rollouts["train"]
        assert kept is r  # kept for the training step


# ---------------------------------------------------------------- loss and accumulation
@pytest.mark.parametrize("kl", [False, True], ids=["no-kl", "kl"])
@objective
def test_loop_loss_is_the_policy_loss_and_accumulation_does_not_change_gradients(cls, kl, synthetic_dir):
    """The losses the loop backpropagates add up to ``policy_loss`` of the whole step, computed on plain
    per-sample log-probs with the chunk's own normalisation, and one optimiser step's gradients do not
    depend on how many forwards it is split into."""
    module = build(cls, loop={"max_grad_norm": None}, **(with_kl(cls) if kl else {}))
    dm = prompt_dm(module.backbone.processor, synthetic_dir)
    batch = prompt_batch(dm)
    r = prepared_rollout(module, batch)
    plain = plain_logps(module.backbone.model, dm, r, batch["rows"])
    mask = r.completion_mask
    gen = torch.Generator().manual_seed(0)
    # Off-policy old log-probs: half the samples barely moved, half far (inside and outside any clip range).
    scale = torch.tensor([1e-4, 0.3]).repeat(B * G // 2)[:, None]
    r.old_logps = (plain + scale * torch.randn(plain.shape, generator=gen)) * mask
    assert (r.ref_logps is not None) == kl
    if kl:  # a reference away from the policy
        r.ref_logps = (plain + 0.3 * torch.randn(plain.shape, generator=gen)) * mask
    assert r.advantages.abs().sum() > 0
    rows = r.rows_of(list(range(G)))
    step = Chunk(logps=plain[rows], old_logps=r.old_logps[rows], ref_logps=r.ref_logps[rows] if kl else None,
                 advantages=r.advantages[rows], mask=mask[rows], totals=None, rollout=r,
                 samples=list(range(G)), rows=rows)  # fmt: skip
    want, _ = module.policy_loss(step)
    (l1, g1), (l2, g2) = [train_manually(module, [r], acc) for acc in (1, 2)]
    assert len(l1) == 1 and len(l2) == 2 and len(g1) == len(g2) == 1  # one optimiser step either way
    assert torch.allclose(l1.sum(), want, atol=1e-5) and torch.allclose(l2.sum(), want, atol=1e-5)
    assert g1[0].keys() == g2[0].keys() and any(g.abs().max() > 0 for g in g1[0].values())
    for name, g in g1[0].items():
        assert torch.allclose(g, g2[0][name], atol=1e-6, rtol=1e-4), name


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, dropout=0.0)], ids=["full", "lora"])
@objective
def test_training_moves_trainable_weights_only_and_keeps_the_reference(cls, lora, synthetic_dir):
    # Two optimiser steps per rollout (LoRA's A matrices first move on the second, once B is non-zero):
    # two passes over the rollout with full weights, two mini-batches with LoRA.
    settings = {"num_iterations": 2} if lora is None else {"mini_batches": 2}
    kw = kl_kwargs(cls) or {}
    module = build(cls, lora=lora, loop=settings, lr=1e-3, **kw)
    bb = module.backbone
    assert (bb._reference is not None) == (bool(kw) and lora is None)  # LoRA: the adapters off
    dm = prompt_dm(bb.processor, synthetic_dir)
    fixed = prepared_rollout(module, prompt_batch(dm))
    if kw:
        with bb.reference() as ref:
            ref_before = loop.logps(module, fixed, model=ref)
    policy_before = loop.logps(module, fixed)
    before = snapshot(module)
    full_ref = bb._reference is not None
    ref_weights = {n: p.detach().clone() for n, p in bb._reference.named_parameters()} if full_ref else {}
    spy = Spy()
    trainer = fit(module, synthetic_dir, [rollout_callback(), spy], steps=2)
    assert len(spy.rollouts) == 1 and all(
        r.old_logps is not None and (r.ref_logps is not None) == bool(kw) for (r,) in spy.rollouts
    )
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    tower = {id(p) for p in bb.vision_tower.parameters()}
    for name, p in module.named_parameters():
        assert (not torch.equal(before[name], p)) == p.requires_grad, name
        assert not (p.requires_grad and id(p) in tower), name  # vision: frozen
    if full_ref:
        assert all(torch.equal(p, ref_weights[n]) for n, p in bb._reference.named_parameters())
    if kw:
        with bb.reference() as ref:
            assert torch.allclose(loop.logps(module, fixed, model=ref), ref_before, atol=1e-6)
    assert not torch.allclose(loop.logps(module, fixed), policy_before, atol=1e-4)  # the policy moved


# ---------------------------------------------------------------- held-out batches
@objective
def test_held_out_batches_log_the_greedy_rewards_and_predict_rows(cls, synthetic_dir):
    module = build(cls)
    callback = rollout_callback(rewards=(token_reward, even_prompts))
    val = str(synthetic_dir / "prompt_val.jsonl")
    dm = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"), val=val, test=val, batch_size=B,
                          eval_batch_size=B)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1,
                        limit_test_batches=1, limit_predict_batches=1, callbacks=[callback])  # fmt: skip
    (metrics,) = trainer.validate(module, dm, verbose=False)
    for key in ("val/reward", "val/rewards/token_reward", "val/rewards/even_prompts"):
        assert key in metrics and math.isfinite(metrics[key]), key
    (metrics,) = trainer.test(module, dm, verbose=False)
    assert "test/reward" in metrics and math.isfinite(metrics["test/reward"])
    (rows,) = trainer.predict(module, datamodule=dm)
    assert len(rows) == B and all({"row", "completion", "reward", "token_reward"} <= set(r) for r in rows)
    assert [r["even_prompts"] is None for r in rows] == [False, True]  # not applicable: None, not NaN


# ---------------------------------------------------------------- bad settings
@objective
def test_bad_settings_fail_clearly(cls, synthetic_dir):
    name = cls.__name__
    least = build(cls).needs().min_group_size
    if least > 1:
        with pytest.raises(ValueError, match=f"num_generations must be at least {least} for {name}"):
            fit(build(cls), synthetic_dir, [rollout_callback(num_generations=least - 1)])
    with pytest.raises(ValueError, match=r"rollout.num_generations \(4\) must be divisible by "
                                         r"model.loop.mini_batches x model.loop.accumulation \(3 x 1\)"):  # fmt: skip
        fit(build(cls, loop={"mini_batches": 3}), synthetic_dir, [rollout_callback()])
    with pytest.raises(ValueError, match="model.loop.accumulation must be at least 1, got 0"):
        build(cls, loop={"accumulation": 0})
    with pytest.raises(RuntimeError, match=rf"{name} got no rollout for this train batch: .* need a "
                                           r"lightning_vlm.rollout.RolloutCallback"):  # fmt: skip
        fit(build(cls), synthetic_dir, [])


def test_a_reward_that_applies_to_no_held_out_answer_is_still_logged(synthetic_dir):
    """Every rank logs every held-out key (weight 0 where a function applied to nothing), so ranks never
    disagree on the set of keys their reductions synchronise."""
    module = build(GRPO)
    never = lambda prompts, completions, **row: [None] * len(completions)  # noqa: E731 - applies to none
    val = str(synthetic_dir / "prompt_val.jsonl")
    dm = PromptDataModule(
        train=str(synthetic_dir / "prompt_train.jsonl"), val=val, batch_size=B, eval_batch_size=B
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1,
                        callbacks=[rollout_callback(rewards=(token_reward, never))])  # fmt: skip
    (metrics,) = trainer.validate(module, dm, verbose=False)
    assert "val/rewards/<lambda>" in metrics and math.isfinite(metrics["val/rewards/token_reward"])


@objective
def test_held_out_samples_log_their_score_and_kl_only_when_asked(cls, synthetic_dir):
    module = build(cls, **with_kl(cls))
    val = str(synthetic_dir / "prompt_val.jsonl")
    dm = PromptDataModule(
        train=str(synthetic_dir / "prompt_train.jsonl"), val=val, batch_size=B, eval_batch_size=B
    )
    for eval_sampling in (False, True):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1,
                            callbacks=[rollout_callback(eval_sampling=eval_sampling)])  # fmt: skip
        (metrics,) = trainer.validate(module, dm, verbose=False)
        assert ("val/score" in metrics) == ("val/kl" in metrics) == eval_sampling
    # The policy is the reference here: sampled answers are exactly as likely under both.
    assert metrics["val/kl"] == pytest.approx(0.0, abs=1e-5) and math.isfinite(metrics["val/score"])
