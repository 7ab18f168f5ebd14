"""The update loop shared by the online objectives: prompt once and vision once per step, no work that
changes nothing, log-probs equal plain per-sample forwards (block order, temperature, old policy and
reference), the objectives' losses are their loss functions, and the MoE router loss."""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM
from lightning_vlm.losses import grpo_loss, gspo_loss
from lightning_vlm.objectives import GRPO, GSPO
from lightning_vlm.objectives.online import Chunk, OnlineSettings, loop
from lightning_vlm.rollout import Generation, HFEngine, Rollout, RolloutEngine
from lightning_vlm.rollout.rollout import completion_mask
from tests.helpers.online import (
    NEW,
    B,
    Batches,
    G,
    Spy,
    bind,
    build,
    count_calls,
    fit,
    online_objectives,
    plain_logps,
    prepared_rollout,
    prompt_batch,
    prompt_dm,
    rollout_callback,
    snapshot,
    train_manually,
)


# ---------------------------------------------------------------- counting (prompt once, vision once)
def test_frozen_tower_runs_once_and_the_prompt_is_prefilled_once(grpo_run):
    calls = grpo_run["calls"]
    assert calls["tower"] == grpo_run["batches"].patches  # one call, the B prompts' images once
    prefills = [c for c in calls["lm"] if c[1] > 1 and not c[2]]
    assert prefills and [c[0] for c in prefills] == [B]  # one prefill of the B prompts, not B*G
    decode = [c for c in calls["lm"] if c[1] == 1]
    assert len(decode) == NEW and all(c[0] == B * G for c in decode)  # G continuations per prompt
    training = [c for c in calls["lm"] if c[2]]
    # One training forward, no re-encoding: the B prompts once (shared prefix), then all samples' completions.
    assert [c[:2] for c in training] == [(B, prefills[0][1] + 1), (B * G, NEW)]  # the prefill: all but one
    assert len(calls["lm"]) == 1 + NEW + 2  # no old-policy and no reference forward


def test_trained_tower_runs_once_per_rollout_and_once_per_forward(synthetic_dir):
    module = build(GRPO, vision="train", loop={"accumulation": 2}, lr=1e-3)
    calls = count_calls(module)
    batches = Batches()
    fit(module, synthetic_dir, [rollout_callback(), batches])
    patches = batches.patches[0]
    assert calls["tower"] == [patches] * 3  # rollout + one per forward (accumulation=2), each B prompts once
    prefills = [c for c in calls["lm"] if c[1] > 1 and not c[2]]
    assert [c[0] for c in prefills] == [B]
    assert [c[0] for c in calls["lm"] if c[2]] == [B, B * G // 2] * 2  # shared prefix: prompts, completions


def test_trained_tower_old_policy_pass_reuses_the_rollout_features(synthetic_dir):
    """The old-policy pass runs at the weights that sampled, without gradient: it takes the rollout's
    image features; the training forwards still encode, with gradient, and the tower trains."""
    module = build(GRPO, vision="train", loop={"mini_batches": 2}, lr=1e-2)
    bb = module.backbone
    tower: list[bool] = []  # one entry per vision tower call: was gradient on?
    bb.vision_tower.register_forward_hook(lambda mod, args, out: tower.append(torch.is_grad_enabled()))
    weights = {n: p.detach().clone() for n, p in bb.vision_tower.named_parameters()}

    def probe(m, rollouts):  # right after the hand-over (sampling and old-policy pass), before any step
        (r,) = rollouts
        calls = len(tower)
        return calls, loop.logps(m, replace(r, features=None))  # every chunk encodes its images

    spy = Spy(probe)
    fit(module, synthetic_dir, [rollout_callback(), spy], steps=2)  # one rollout, two optimiser steps
    (r,), (calls, reencoded) = spy.rollouts[0], spy.probes[0]
    assert calls == 1  # the rollout's encoding only (before: 1 + one per old-policy chunk = 3)
    assert torch.equal(r.old_logps, reencoded)
    assert tower[calls + 2 :] == [True, True]  # each training forward encodes again, with gradient
    assert r.features is None  # dropped once training starts: stale after the first optimiser step
    assert any(not torch.equal(p, weights[n]) for n, p in bb.vision_tower.named_parameters())


def test_the_reference_of_an_adapted_tower_does_not_take_the_rollouts_features(synthetic_dir):
    """With LoRA on the tower the reference (adapters off) sees other image features than the policy, though
    inside ``reference()`` peft's disabled adapters no longer require gradients."""
    lora = LoraSettings(r=4, dropout=0.0)
    module = build(GRPO, vision="lora", lora=lora, loop={"mini_batches": 2}, beta=0.1)
    bb = module.backbone
    with torch.no_grad():  # adapters away from zero (the language model's stay 0): only the images differ
        for name, p in bb.vision_tower.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    r = prepared_rollout(module, prompt_batch(prompt_dm(bb.processor, synthetic_dir)))
    assert r.features is not None and r.old_logps is not None and r.ref_logps is not None
    with bb.reference() as ref:
        assert not bb.vision_is_frozen
        own = loop.logps(module, replace(r, features=None), model=ref)  # the reference encodes its own
    assert torch.equal(r.ref_logps, own)
    assert not torch.allclose(r.ref_logps, r.old_logps, atol=1e-3)  # the adapters matter


# ---------------------------------------------------------------- no work that changes nothing
def test_on_policy_without_kl_computes_no_old_or_reference_logps(grpo_run):
    """GRPO's end-to-end run; every online objective's rollouts are checked in test_objectives.py."""
    (rollout,) = grpo_run["spy"].rollouts[0]
    assert rollout.old_logps is None and rollout.ref_logps is None
    assert rollout.advantages is not None  # the objective's on_rollout ran
    assert grpo_run["module"].backbone._reference is None
    assert rollout.features is not None  # frozen tower: the rollout hands its image features on


def test_old_and_reference_logps_are_the_policy_before_the_step_and_the_reference(synthetic_dir):
    module = build(GRPO, loop={"mini_batches": 2}, beta=0.1, lr=1e-2)
    assert module.backbone._reference is not None
    with torch.no_grad():  # the policy starts away from the reference, so the two can be told apart
        module.backbone.model.get_output_embeddings().weight.mul_(1.5)
    dm = prompt_dm(module.backbone.processor, synthetic_dir)

    def probe(m, rollouts):  # right after the hand-over, before the first optimiser step
        (r,) = rollouts
        return plain_logps(m.backbone.model, dm, r, r.rows), plain_logps(m.backbone._reference, dm, r, r.rows)

    spy = Spy(probe)
    fit(module, synthetic_dir, [rollout_callback(), spy], steps=2)  # one rollout, two optimiser steps
    (r,), (policy, reference) = spy.rollouts[0], spy.probes[0]
    mask = r.completion_mask.bool()
    assert not torch.allclose(policy[mask], reference[mask], atol=1e-3)
    assert torch.allclose(r.old_logps[mask], policy[mask], atol=1e-5)  # the policy before the first step
    assert torch.allclose(r.ref_logps[mask], reference[mask], atol=1e-5)
    assert (r.old_logps[~mask] == 0).all() and (r.ref_logps[~mask] == 0).all()
    assert not torch.allclose(loop.logps(module, r)[mask], policy[mask], atol=1e-4)  # two steps were taken


# ---------------------------------------------------------------- log-prob equivalence
@pytest.mark.parametrize("vision", ["frozen", "train"])
@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_block_order_logps_equal_plain_per_sample_forwards(family, vision, synthetic_dir):
    # Forwards of 2 samples per prompt.
    module = build(GRPO, family=family, vision=vision, loop={"accumulation": 2})
    bb = module.backbone
    dm = prompt_dm(bb.processor, synthetic_dir)
    batch = prompt_batch(dm, start=1)  # rows 1, 2: one and two images
    assert sorted(len(im) for im in batch["images"]) == [1, 2]
    r = prepared_rollout(module, batch)
    assert r.rows == batch["rows"]
    assert bb.vision_is_frozen == (vision == "frozen" and family != "llava")
    assert r.features is not None  # computed without gradient, at the weights that sampled
    tower: list[int] = []
    bb.vision_tower.register_forward_hook(lambda mod, args, out: tower.append(1))
    ours = loop.logps(module, r)
    assert not tower  # the no-grad pass at the sampling weights reuses the features (also a trained tower)
    assert torch.equal(ours, loop.logps(module, replace(r, features=None)))  # as encoding per forward
    plain = plain_logps(bb.model, dm, r, batch["rows"])
    mask = r.completion_mask.bool()
    assert torch.allclose(ours[mask], plain[mask], atol=1e-5)
    assert (ours[~mask] == 0).all()


def test_logps_use_the_sampling_temperature(synthetic_dir):
    """Sampled at temperature T, a token's probability is softmax(logits / T): the old, reference and
    training log-probs score that distribution, not the untempered one."""
    module = build(GRPO, beta=0.1, loop={"num_iterations": 2})
    bb = module.backbone
    dm = prompt_dm(bb.processor, synthetic_dir)
    batch = prompt_batch(dm)
    r = prepared_rollout(module, batch, rollout_callback(temperature=0.5))
    assert r.temperature == 0.5 == r.sampling.temperature
    ours = loop.logps(module, r)
    mask = r.completion_mask.bool()
    assert torch.allclose(ours[mask], plain_logps(bb.model, dm, r, batch["rows"], 0.5)[mask], atol=1e-5)
    assert not torch.allclose(ours[mask], plain_logps(bb.model, dm, r, batch["rows"])[mask], atol=1e-3)
    assert torch.allclose(r.old_logps, ours, atol=1e-6)  # the hand-over's old log-probs too
    with bb.reference() as ref:
        assert torch.allclose(loop.logps(module, r, model=ref), ours, atol=1e-6)  # untrained: ref = policy
    assert torch.allclose(r.ref_logps, ours, atol=1e-6)
    logps, _, _ = loop.forward(module, r, [0, 1])
    assert torch.allclose(logps, ours[r.rows_of([0, 1])], atol=1e-5)  # the training forward too


# ---------------------------------------------------------------- each objective's loss is its loss function
def _chunk(kw: dict, tokens_clipped: float) -> Chunk:
    """A chunk of B*G random sequences of NEW tokens, the old log-probs ``tokens_clipped`` nats away."""
    gen = torch.Generator().manual_seed(0)
    shape = (B * G, NEW)
    logps = -torch.rand(shape, generator=gen) * 3
    mask = torch.ones(shape)
    mask[1, 2:] = 0
    mask[6, 1:] = 0
    old = (logps + tokens_clipped * torch.randn(shape, generator=gen)) * mask
    ref = (logps + 0.3 * torch.randn(shape, generator=gen)) * mask
    return Chunk(
        logps=logps.requires_grad_(True),
        old_logps=old,
        ref_logps=ref if kw.get("beta") else None,
        advantages=torch.randn(B * G, generator=gen),
        mask=mask,
        totals=None,  # the chunk is the whole step
        rollout=SimpleNamespace(max_new_tokens=NEW),
        samples=list(range(G)),
        rows=torch.arange(B * G),
    )


@pytest.mark.parametrize("cls, kw", [(GRPO, {"norm": "dapo", "beta": 0.05}), (GRPO, {"norm": "grpo"}),
                                     (GRPO, {"norm": "dr_grpo", "eps_high": 0.28}), (GSPO, {}),
                                     (GSPO, {"beta": 0.05, "token_level": True})],
                         ids=["grpo-dapo-kl", "grpo-grpo", "grpo-dr_grpo", "gspo", "gspo-token-kl"])  # fmt: skip
def test_policy_loss_is_the_loss_function(cls, kw):
    """With the loop's own checks (test_objectives.py: the loop's loss is ``policy_loss`` of the whole
    step on plain log-probs, whatever the accumulation), the trained loss is the loss function."""
    module = cls(BackboneConfig(tiny=TinyVLM()), **kw)
    noise = 0.3 if cls is GRPO else 2e-4  # inside and outside the clip range (GSPO clips at ~3e-4)
    chunk = _chunk(kw, noise)
    loss, metrics = module.policy_loss(chunk)
    args = (chunk.logps, chunk.old_logps, chunk.advantages, chunk.mask)
    if cls is GRPO:
        h = module.hparams
        want, want_metrics = grpo_loss(*args, eps_low=h.eps_low, eps_high=h.eps_high, beta=h.beta,
                                       ref_logps=chunk.ref_logps, norm=h.norm, max_completion_length=NEW)  # fmt: skip
        assert 0 < want_metrics["clip/low"] + want_metrics["clip/high"] < 1  # some tokens clipped, some not
    else:
        want, _ = gspo_loss(*args, beta=kw.get("beta", 0.0), ref_logps=chunk.ref_logps,
                            token_level=kw.get("token_level", False))  # fmt: skip
    assert torch.allclose(loss, want, atol=1e-6)
    (ours,) = torch.autograd.grad(loss, chunk.logps, retain_graph=True)
    (theirs,) = torch.autograd.grad(want, chunk.logps)
    assert ours.abs().sum() > 0 and torch.allclose(ours, theirs, atol=1e-7)


# ---------------------------------------------------------------- an engine that is not the trainer
class OffsetEngine(RolloutEngine):
    """Hugging Face sampling that reports the trainer's own log-probs of its samples moved by ``offset``,
    down on even rows and up on odd ones (TIS weights e^offset and e^-offset): an engine whose numerics
    are not the trainer's. Its weights never go stale here, so ``sync_weights`` stays the no-op."""

    samples_from_trainer = False

    def __init__(self, module, offset: float):
        self.hf, self.module, self.offset = HFEngine(), module, offset

    def setup(self, backbone):
        self.hf.setup(backbone)

    def generate(self, request):
        ids = self.hf.generate(request).completion_ids
        mask, truncated = completion_mask(ids, self.module.backbone.tokenizer.eos_token_id)
        n = len(ids)
        r = Rollout(request.prompt_ids, request.prompt_mask, request.vision, request.features, ids, mask,
                    request.num_samples, torch.zeros(n), {}, [""] * n, truncated,
                    torch.ones(n, dtype=torch.bool), request.sampling)  # fmt: skip
        sign = 1.0 - 2.0 * (torch.arange(n) % 2)  # (B*G,) +1 on even rows
        return Generation(ids, logps=(loop.logps(self.module, r) - sign[:, None] * self.offset) * mask)


def _engine_step(synthetic_dir, offset: float, tis_cap: float | None):
    """One GRPO step with an ``OffsetEngine``: (each parameter's update, the logged metrics, the rollout)."""
    module = build(GRPO, loop={"tis_cap": tis_cap}, lr=1e-2)
    before, spy = snapshot(module), Spy()
    trainer = fit(module, synthetic_dir, [rollout_callback(engine=OffsetEngine(module, offset)), spy])
    update = {n: p.detach() - before[n] for n, p in module.named_parameters()}
    return update, trainer.callback_metrics, spy.rollouts[0][0]


def test_engine_logps_are_measured_against_the_trainers_and_reweight_the_update(synthetic_dir):
    """``rollout/logp_gap`` is |engine - trainer| over the kept tokens; TIS (``loop.tis_cap``, default 2)
    changes the update when the engine's log-probs are far from the trainer's, and not when they agree."""
    capped, metrics, r = _engine_step(synthetic_dir, 3.0, 2.0)
    plain, plain_metrics, _ = _engine_step(synthetic_dir, 3.0, None)
    for m in (metrics, plain_metrics):
        assert float(m["rollout/logp_gap"]) == pytest.approx(3.0, abs=1e-4)
        assert float(m["rollout/logp_gap_max"]) == pytest.approx(3.0, abs=1e-4)
    mask = r.completion_mask.float()  # even rows: weight e^3, clipped at 2; odd rows: e^-3
    assert float(metrics["rollout/tis_clipped"]) == pytest.approx(float(mask[0::2].sum() / mask.sum()))
    assert "rollout/tis_clipped" not in plain_metrics and "train/rollout/logp_gap" not in metrics
    assert any(not torch.allclose(capped[n], plain[n], atol=1e-5) for n in capped)
    agree, agree_metrics, _ = _engine_step(synthetic_dir, 0.0, 2.0)
    agree_plain, _, _ = _engine_step(synthetic_dir, 0.0, None)
    assert float(agree_metrics["rollout/logp_gap"]) < 1e-5
    assert float(agree_metrics["rollout/tis_clipped"]) == 0
    assert any(u.abs().max() > 1e-4 for u in agree.values())  # the step did move the weights
    assert all(torch.allclose(agree[n], agree_plain[n], atol=1e-7) for n in agree)


def test_tis_cap_must_be_positive():
    with pytest.raises(ValueError, match=r"model.loop.tis_cap must be positive \(null: off\), got 0"):
        GRPO(BackboneConfig(tiny=TinyVLM()), loop={"tis_cap": 0.0})


@pytest.mark.parametrize("cls", online_objectives(), ids=lambda c: c.__name__)
def test_policy_loss_passes_the_engines_logps_and_the_cap(cls):
    """A chunk's engine log-probs reach the loss function: a uniform weight pi_old / pi_sampler = 1.5,
    below the cap, scales the (KL-free) policy loss by 1.5, per token or per sequence; no cap, no change."""
    module = cls(BackboneConfig(tiny=TinyVLM()))
    chunk = _chunk({}, 2e-4)
    plain, _ = module.policy_loss(chunk)
    sampler = chunk.old_logps - math.log(1.5)
    weighted, metrics = module.policy_loss(replace(chunk, sampler_logps=sampler, tis_cap=2.0))
    assert plain.abs() > 1e-3 and torch.allclose(weighted, 1.5 * plain, rtol=1e-5)
    assert float(metrics["rollout/tis_clipped"]) == 0.0
    assert torch.equal(module.policy_loss(replace(chunk, sampler_logps=sampler))[0], plain)


# ---------------------------------------------------------------- MoE
def test_gspo_router_aux_loss_trains_the_routers(synthetic_dir):
    module = build(GSPO, family="qwen3_vl_moe", loop={"router_aux_coef": 0.01}, lr=1e-2)
    before = snapshot(module)
    flat = lambda prompts, completions, **row: [1.0] * len(completions)  # noqa: E731 - no advantage at all
    trainer = fit(module, synthetic_dir, [rollout_callback(rewards=(flat,))])
    aux = trainer.callback_metrics["train/router_aux_loss"]
    assert torch.isfinite(aux) and aux > 0
    assert trainer.callback_metrics["train/loss"] == pytest.approx(0.01 * float(aux))  # the policy loss is 0
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}
    routers = {n for n in before if n.endswith("mlp.gate.weight")}
    assert len(routers) == 2 and routers <= changed  # the aux loss reached every router...
    # ...and nothing after the last router: the zero-advantage policy loss gave no gradient at all
    last = "language_model.layers.1.mlp.experts."
    after_routers = {
        n for n in before if last in n or n.endswith(("lm_head.weight", "language_model.norm.weight"))
    }
    assert len(after_routers) == 4 and not after_routers & changed


def test_a_chunk_without_kept_samples_adds_no_router_loss_on_any_rank(synthetic_dir):
    """Dynamic sampling can leave a rank no kept sample. With several ranks every rank still runs every
    forward (DDP needs the same collectives), but that chunk adds no policy loss and no router loss,
    and a step with no kept forward divides nothing by zero."""
    module = build(GSPO, family="qwen3_vl_moe", loop={"router_aux_coef": 0.01})
    r = prepared_rollout(module, prompt_batch(prompt_dm(module.backbone.processor, synthetic_dir)))
    r.keep[:] = False
    # What the loop reads of a 2-rank trainer; this rank's totals stand for the sum over ranks.
    module._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    try:
        totals = loop.step_totals(module, [r], [[0]])
        loss, metrics = loop.chunk_loss(module, r, [0], totals, forwards=0)
    finally:
        module._trainer = None
    assert loss is not None and torch.isfinite(loss) and float(loss) == 0.0
    assert "router_aux_loss" not in metrics
    loss.backward()  # the forward's graph is there, as DDP's all-reduce expects


def test_batch_reward_std_is_over_the_samples_that_train():
    """``scale_rewards: batch`` divides by the unbiased std of the kept samples' rewards (a group that
    dynamic sampling dropped is left out), and the advantages use it."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0, 0.0, 3.0, 3.0])
    keep = torch.tensor([True] * 4 + [False] * 2 + [True] * 2)
    rollout = SimpleNamespace(rewards=rewards, keep=keep, group_size=2)
    # The two methods read only the rollout, the hyperparameters and the (absent) trainer.
    module = SimpleNamespace(_trainer=None, hparams=SimpleNamespace(scale_rewards="batch"))
    module.reward_std = lambda r: GRPO.reward_std(module, r)
    expected = statistics.stdev([1.0, 0.0, 0.5, 0.25, 3.0, 3.0])
    assert float(GRPO.reward_std(module, rollout)) == pytest.approx(expected, rel=1e-6)
    grouped = rewards.view(-1, 2)
    manual = (grouped - grouped.mean(1, keepdim=True)).reshape(-1) / (expected + 1e-4)
    torch.testing.assert_close(GRPO.advantages(module, rollout), manual)


def test_grad_norm_is_logged_before_the_loops_clipping(synthetic_dir):
    module = build(lr=1e-3, loop={"max_grad_norm": 1e-4})
    norms = []
    clip = module.clip_gradients

    def measured(optimizer, **kw):  # the norm the loop's clipping sees
        norms.append(
            float(torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]).norm())
        )
        return clip(optimizer, **kw)

    module.clip_gradients = measured
    trainer = fit(module, synthetic_dir, [rollout_callback()])
    (want,) = norms
    assert want > 1e-2  # far above max_grad_norm: a clipped norm would read 1e-4
    assert float(trainer.callback_metrics["train/grad_norm"]) == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------- shared prefix
def _handed_over(module, sampled: Rollout) -> Rollout:
    """A copy of ``sampled`` after ``module``'s ``on_rollout`` (old-policy and reference log-probs)."""
    module.on_rollout([copy.deepcopy(sampled)], "train")
    (taken,) = module._rollouts.pop("train")
    return taken


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("cls", [GRPO, GSPO])
def test_shared_prefix_gives_the_per_sequence_step(cls, checkpointing, synthetic_dir):
    """One step with ``shared_prefix`` on and off (trained tower, a reference, 2 optimiser steps so the
    old-policy pass runs): the same old and reference log-probs, losses and gradients; also with the
    shared prefix under gradient checkpointing (the zoo's recipes), against the plain forward without."""
    modules = [
        build(
            cls,
            vision="train",
            loop={"shared_prefix": on, "mini_batches": 2, "max_grad_norm": None},
            beta=0.1,
            checkpointing=checkpointing and on,
        )
        for on in (1, 0)
    ]
    calls = count_calls(modules[0])
    batch = prompt_batch(prompt_dm(modules[0].backbone.processor, synthetic_dir), start=1)
    sampled = bind(rollout_callback(), modules[1]).sample(modules[1], batch)
    (a, b) = [_handed_over(m, sampled) for m in modules]
    assert torch.allclose(a.old_logps, b.old_logps, atol=1e-5) and torch.allclose(
        a.ref_logps, b.ref_logps, atol=1e-5
    )
    (la, ga), (lb, gb) = [
        train_manually(m, [r], accumulation=1) for m, r in zip(modules, (a, b), strict=True)
    ]
    assert torch.allclose(la, lb, atol=1e-6) and la.abs().max() > 0
    for step_a, step_b in zip(ga, gb, strict=True):
        assert step_a.keys() == step_b.keys()
        for name, g in step_a.items():
            assert (g - step_b[name]).abs().max() <= 1e-5 + 1e-4 * g.abs().max(), name
    assert [c[0] for c in calls["lm"] if c[2]] == [B, B * G // 2] * 2  # the prompts once per forward


def test_gradient_checkpointing_falls_back_to_per_sequence_forwards(synthetic_dir, monkeypatch):
    """Under gradient checkpointing a transformers whose checkpointed layers cannot keep the KV cache
    (``GradientCheckpointingLayer`` without ``_can_checkpoint_with_cache``) drops it, so the completions
    would not see the prompt: the loop scores per sequence and says why, once."""
    monkeypatch.setattr("transformers.modeling_layers.GradientCheckpointingLayer", torch.nn.Module)  # a layer class without it
    torch.manual_seed(0)
    config = BackboneConfig(tiny=TinyVLM(family="qwen2_vl"), gradient_checkpointing=True)
    module = GRPO(config, loop=OnlineSettings(mini_batches=2))
    module.configure_model()
    batch = prompt_batch(prompt_dm(module.backbone.processor, synthetic_dir))
    with pytest.warns(UserWarning, match="shared_prefix.*gradient checkpointing") as warned:
        r = prepared_rollout(module, batch)  # its old-policy pass (2 optimiser steps)
        ours = loop.forward(module, r, [0, 1], entropy=True)[0]
    assert len([w for w in warned if "shared_prefix" in str(w.message)]) == 1
    module.settings.shared_prefix = False
    assert torch.allclose(ours, loop.forward(module, r, [0, 1])[0], atol=1e-6)
