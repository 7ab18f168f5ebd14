"""Online RL (GRPO, GSPO): prompt once, vision once, no work that changes nothing, log-prob and
loss equivalence, training, dynamic sampling, bad input, sample tables, MoE router loss, masks,
validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM, VLMBackbone
from lightning_vlm.data import PromptDataModule
from lightning_vlm.data.prompt import PromptCollator
from lightning_vlm.losses import group_advantages, grpo_loss, gspo_loss
from lightning_vlm.objectives import GRPO, GSPO
from lightning_vlm.rollout import RolloutCallback, completion_mask

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava"]
B, G, NEW = 2, 4, 4  # prompts per batch, completions per prompt, max_new_tokens


# ---------------------------------------------------------------- helpers
def token_reward(prompts, completions, completion_ids, **row):
    """Varies between the samples of a group (so advantages are non-zero) and is cheap."""
    return [float(sum((i + 1) * t for i, t in enumerate(ids)) % 101) for ids in completion_ids]


def even_prompts(prompts, completions, completion_ids, group, **row):
    """Applies to even prompts only (None elsewhere): the completion's token count."""
    return [None if g % 2 else float(len(ids)) for ids, g in zip(completion_ids, group, strict=True)]


def _dm(processor, synthetic_dir, batch_size=B, **kw) -> PromptDataModule:
    dm = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"),
                          val=str(synthetic_dir / "prompt_val.jsonl"), batch_size=batch_size, **kw)  # fmt: skip
    dm.processor = processor
    dm.setup("fit")
    return dm


def _batch(dm, n: int | None = None, start: int = 0) -> dict:
    """Rows ``start..start+n`` of the training split, collated like a training batch."""
    ds = dm.datasets["train"]
    n = n or dm.hparams.batch_size
    return PromptCollator(dm.processor)([ds[i] for i in range(start, start + n)])


def _module(cls=GRPO, family="qwen2_vl", vision="frozen", lora=None, **kw):
    torch.manual_seed(0)
    module = cls(BackboneConfig(tiny=TinyVLM(family=family), vision=vision, lora=lora), **kw)
    module.configure_model()
    return module


def _callback(rewards=(token_reward,), **kw) -> RolloutCallback:
    return RolloutCallback(**{"num_generations": G, "max_new_tokens": NEW, "rewards": list(rewards),
                              "table_every_n_steps": 0, **kw})  # fmt: skip


def _rollout(module, batch, callback=None):
    callback = callback or _callback()
    r = callback.rollout(module, batch)
    r.advantages = module.online.advantages(r)
    return r


def _fit(module, synthetic_dir, callbacks, steps=1, batch_size=B, **trainer):
    dm = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"),
                          val=str(synthetic_dir / "prompt_val.jsonl"), batch_size=batch_size)  # fmt: skip
    settings = dict(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer = L.Trainer(callbacks=list(callbacks), **{**settings, **trainer})
    trainer.fit(module, dm)
    return trainer


class Spy(L.Callback):
    """Keeps every step's rollouts; optionally runs ``probe(module, rollouts)`` before the step's update
    (it must come after the RolloutCallback in ``callbacks``)."""

    def __init__(self, probe=None):
        self.probe, self.rollouts, self.probes = probe, [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.probe is not None:
            self.probes.append(self.probe(module, batch["rollouts"]))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rollouts.append(batch["rollouts"])


def _extend(vision: dict, shape: tuple, n: int) -> dict:
    """A single prompt's vision dict for the prompt followed by ``n`` completion tokens."""
    return {k: torch.cat([v, v.new_zeros(v.shape[0], n)], 1)
            if isinstance(v, torch.Tensor) and tuple(v.shape) == shape else v
            for k, v in vision.items()}  # fmt: skip


@torch.no_grad()
def _plain_logps(model, dm, rollout, rows: list, temperature: float = 1.0) -> torch.Tensor:
    """(B*G, N) log-probs from plain full-vocabulary forwards: per prompt, its G sequences (the prompt
    unpadded, collated G times so each sequence has its own copy of the images, then the completion,
    masked after EOS); no shared features, no copies, no chunks."""
    G, N = rollout.group_size, rollout.completion_ids.shape[1]
    ds = dm.datasets["train"]
    by_row = {ds[i]["__row"]: i for i in range(len(ds))}
    out = torch.zeros(rollout.completion_ids.shape)
    for i, row in enumerate(rows):
        many = PromptCollator(dm.processor)([ds[by_row[row]]] * G)
        ids, cmask = rollout.completion_ids[i * G : (i + 1) * G], rollout.completion_mask[i * G : (i + 1) * G]
        P = many["input_ids"].shape[1]
        assert many["attention_mask"].all()  # one prompt G times: no padding
        full = torch.cat([many["input_ids"], ids * cmask], 1)
        vision = _extend(many["vision"], tuple(many["input_ids"].shape), N)
        logits = model(
            input_ids=full, attention_mask=torch.cat([many["attention_mask"], cmask], 1), **vision
        ).logits
        lp = (logits[:, P - 1 : -1].float() / temperature).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
        out[i * G : (i + 1) * G] = lp * cmask
    return out


@torch.no_grad()
def _sharpen(model, factor: float = 4.0) -> None:
    """Scale the random weights up: the untrained tiny models otherwise repeat one token whatever the
    prompt, and a greedy comparison would prove little."""
    for p in model.parameters():
        if p.ndim >= 2:
            p.mul_(factor)


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---------------------------------------------------------------- 1. prompt once
@pytest.mark.parametrize("family", FAMILIES)
def test_g_samples_from_one_prefill_equal_plain_greedy(family, synthetic_dir):
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM(family=family)))
    bb.load()
    _sharpen(bb.model)
    dm = _dm(bb.processor, synthetic_dir)
    batch = _batch(dm)  # one and two images
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # left padding really happens
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"])
    greedy = bb.generate(*args, max_new_tokens=NEW)  # stock generate, one row per prompt
    assert greedy.shape == (B, NEW)
    assert len({tuple(row) for row in greedy.tolist()}) > 1  # answers depend on the prompt...
    other = {**batch["vision"], "pixel_values": batch["vision"]["pixel_values"].flip(0)}
    assert not torch.equal(bb.generate(args[0], args[1], other, max_new_tokens=NEW), greedy)  # ...and image
    calls: list[int] = []
    hook = bb.vision_tower.register_forward_hook(lambda mod, a, out: calls.append(1))
    try:
        many = bb.generate(*args, max_new_tokens=NEW, do_sample=False, num_return_sequences=G)
        assert len(calls) == 1  # the prefill encodes the images once, not G times
        features = bb.encode_images(batch["vision"])
        calls.clear()
        with_features = bb.generate(*args, max_new_tokens=NEW, num_return_sequences=G, features=features)
        one_with_features = bb.generate(*args, max_new_tokens=NEW, features=features)
        assert calls == []  # the features replace the tower
    finally:
        hook.remove()
    assert torch.equal(many, greedy.repeat_interleave(G, dim=0))
    assert torch.equal(with_features, greedy.repeat_interleave(G, dim=0))
    assert torch.equal(one_with_features, greedy)


# ---------------------------------------------------------------- 11. masks and image tokens
def test_completion_mask_edge_cases():
    eos = 7
    ids = torch.tensor([
        [7, 0, 0, 0],  # EOS first
        [1, 2, 3, 7],  # EOS last
        [1, 2, 3, 4],  # no EOS: truncated
        [1, 7, 2, 7],  # two EOS: up to the first
    ])  # fmt: skip
    mask, truncated = completion_mask(ids, eos)
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]
    assert mask.dtype == torch.long


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_image_tokens_are_never_generated(family, synthetic_dir):
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM(family=family)))
    bb.load()
    dm = _dm(bb.processor, synthetic_dir)
    batch = _batch(dm)
    config = bb.model.config
    vision_tokens = [t for t in (getattr(config, "image_token_id", None), getattr(config, "vision_start_token_id", None),
                                 getattr(config, "vision_end_token_id", None)) if t is not None]  # fmt: skip
    assert vision_tokens
    plain = bb.tokenizer.convert_tokens_to_ids("red")
    head = bb.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    for rank, t in enumerate(vision_tokens):  # the vision tokens are the most likely of all...
        bias[t] = 1e4 - rank
    bias[plain] = 1e4 - 10  # ...then an ordinary token
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        args = (batch["input_ids"], batch["attention_mask"], batch["vision"])
        with torch.no_grad():
            logits = bb.model(input_ids=args[0], attention_mask=args[1], **args[2]).logits[:, -1]
        assert (logits.argmax(-1) == vision_tokens[0]).all()  # unsuppressed, the image token would win
        greedy = bb.generate(*args, max_new_tokens=3)
        sampled = bb.generate(
            *args, max_new_tokens=3, do_sample=True, num_return_sequences=2, temperature=1e-3
        )
    finally:
        head.bias = None
    for out in (greedy, sampled):
        assert (out == plain).all()


# ---------------------------------------------------------------- one shared GRPO run
def _count_calls(module) -> dict[str, list]:
    """Vision tower calls (patches fed) and language-model calls ((batch, length), grad on?)."""
    bb = module.backbone
    seen: dict[str, list] = {"tower": [], "lm": []}
    bb.vision_tower.register_forward_hook(lambda mod, args, out: seen["tower"].append(args[0].shape[0]))
    language = VLMBackbone._parts(bb.model)[0].language_model

    def lm(mod, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = x if x is not None else kwargs.get("input_ids")
        seen["lm"].append((x.shape[0], x.shape[1], torch.is_grad_enabled()))

    language.register_forward_pre_hook(lm, with_kwargs=True)
    return seen


class Batches(L.Callback):
    """Keeps each training batch's patch count and images (before the step)."""

    def __init__(self):
        self.patches, self.images = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.patches.append(batch["vision"]["pixel_values"].shape[0])
        self.images.append(batch["images"])


@pytest.fixture(scope="module")
def grpo_run(synthetic_dir, tmp_path_factory):
    """One GRPO step (frozen tower, beta 0, one optimiser step per rollout, G=4, B=2) with every
    sample tabled; the module is validated afterwards by the validation test."""
    module = _module(GRPO, lr=1e-3)
    calls = _count_calls(module)
    spy, batches = Spy(), Batches()
    root = tmp_path_factory.mktemp("grpo_run")
    callback = _callback(rewards=(token_reward, even_prompts), table_every_n_steps=1, table_rows=B * G)
    _fit(module, synthetic_dir, [callback, batches, spy], default_root_dir=str(root))
    return {"module": module, "calls": {k: list(v) for k, v in calls.items()}, "spy": spy, "batches": batches,
            "root": root, "callback": callback}  # fmt: skip


# ---------------------------------------------------------------- 2. counting
def test_frozen_tower_runs_once_and_the_prompt_is_prefilled_once(grpo_run):
    calls = grpo_run["calls"]
    assert calls["tower"] == grpo_run["batches"].patches  # one call, the B prompts' images once
    prefills = [c for c in calls["lm"] if c[1] > 1 and not c[2]]
    assert prefills and [c[0] for c in prefills] == [B]  # one prefill of the B prompts, not B*G
    decode = [c for c in calls["lm"] if c[1] == 1]
    assert len(decode) == NEW and all(c[0] == B * G for c in decode)  # G continuations per prompt
    training = [c for c in calls["lm"] if c[2]]
    assert [c[0] for c in training] == [B * G]  # one training forward: all samples, no re-encoding
    assert len(calls["lm"]) == 1 + NEW + 1  # no old-policy and no reference forward


def test_trained_tower_runs_once_per_rollout_and_once_per_forward(synthetic_dir):
    module = _module(GRPO, vision="train", accumulation=2, lr=1e-3)
    calls = _count_calls(module)
    batches = Batches()
    _fit(module, synthetic_dir, [_callback(), batches])
    patches = batches.patches[0]
    assert calls["tower"] == [patches] * 3  # rollout + one per forward (accumulation=2), each B prompts once
    prefills = [c for c in calls["lm"] if c[1] > 1 and not c[2]]
    assert [c[0] for c in prefills] == [B]
    assert [c[0] for c in calls["lm"] if c[2]] == [B * G // 2] * 2


# ---------------------------------------------------------------- 3. no work that changes nothing
def test_on_policy_without_kl_computes_no_old_or_reference_logps(grpo_run):
    (rollout,) = grpo_run["spy"].rollouts[0]
    assert rollout.old_logps is None and rollout.ref_logps is None
    assert grpo_run["module"].backbone._reference is None
    assert rollout.features is not None  # frozen tower: the rollout hands its image features on
    for cls in (GRPO, GSPO):
        needs = [cls(BackboneConfig(tiny=TinyVLM()), **kw).online.needs() for kw in
                 ({}, {"mini_batches": 2}, {"num_iterations": 2}, {"beta": 0.1})]  # fmt: skip
        assert [n["old_logps"] for n in needs] == [False, True, True, False]
        assert [n["ref_logps"] for n in needs] == [False, False, False, True]


def test_old_and_reference_logps_are_the_policy_before_the_step_and_the_reference(synthetic_dir):
    module = _module(GRPO, mini_batches=2, beta=0.1, lr=1e-2)
    assert module.backbone._reference is not None
    with torch.no_grad():  # the policy starts away from the reference, so the two can be told apart
        module.backbone.model.get_output_embeddings().weight.mul_(1.5)
    dm = _dm(module.backbone.processor, synthetic_dir)
    rows: list = []

    class Rows(L.Callback):
        def on_train_batch_start(self, trainer, m, batch, batch_idx):
            rows.append(batch["rows"])

    def probe(m, rollouts):
        (r,) = rollouts
        return _plain_logps(m.backbone.model, dm, r, rows[-1]), _plain_logps(
            m.backbone._reference, dm, r, rows[-1]
        )

    spy = Spy(probe)
    _fit(module, synthetic_dir, [Rows(), _callback(), spy], steps=2)  # one rollout, two optimiser steps
    (r,), (policy, reference) = spy.rollouts[0], spy.probes[0]
    mask = r.completion_mask.bool()
    assert not torch.allclose(policy[mask], reference[mask], atol=1e-3)
    assert torch.allclose(r.old_logps[mask], policy[mask], atol=1e-5)  # the policy before the first step
    assert torch.allclose(r.ref_logps[mask], reference[mask], atol=1e-5)
    assert (r.old_logps[~mask] == 0).all() and (r.ref_logps[~mask] == 0).all()
    assert not torch.allclose(module.online.logps(r)[mask], policy[mask], atol=1e-4)  # two steps were taken


# ---------------------------------------------------------------- 4. log-prob equivalence
@pytest.mark.parametrize("vision", ["frozen", "train"])
@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_block_order_logps_equal_plain_per_sample_forwards(family, vision, synthetic_dir):
    module = _module(GRPO, family=family, vision=vision, accumulation=2)  # forwards of 2 samples per prompt
    bb = module.backbone
    dm = _dm(bb.processor, synthetic_dir)
    batch = _batch(dm, start=1)  # rows 1, 2: one and two images
    assert sorted(len(im) for im in batch["images"]) == [1, 2]
    r = _rollout(module, batch)
    assert (r.features is not None) == bb.vision_is_frozen == (vision == "frozen" and family != "llava")
    tower: list[int] = []
    bb.vision_tower.register_forward_hook(lambda mod, args, out: tower.append(1))
    ours = module.online.logps(r)
    assert len(tower) == (0 if bb.vision_is_frozen else 2)  # features reused, else once per forward
    plain = _plain_logps(bb.model, dm, r, batch["rows"])
    mask = r.completion_mask.bool()
    assert torch.allclose(ours[mask], plain[mask], atol=1e-5)
    assert (ours[~mask] == 0).all()


def test_logps_use_the_sampling_temperature(synthetic_dir):
    """Sampled at temperature T, a token's probability is softmax(logits / T): the old, reference and
    training log-probs score that distribution, not the untempered one."""
    module = _module(GRPO, beta=0.1, num_iterations=2)
    bb = module.backbone
    dm = _dm(bb.processor, synthetic_dir)
    batch = _batch(dm)
    r = _rollout(module, batch, _callback(temperature=0.5))
    assert r.temperature == 0.5
    ours = module.online.logps(r)
    mask = r.completion_mask.bool()
    assert torch.allclose(ours[mask], _plain_logps(bb.model, dm, r, batch["rows"], 0.5)[mask], atol=1e-5)
    assert not torch.allclose(ours[mask], _plain_logps(bb.model, dm, r, batch["rows"])[mask], atol=1e-3)
    with bb.reference() as ref:
        assert torch.allclose(module.online.logps(r, model=ref), ours, atol=1e-6)  # untrained: ref = policy
    logps, _, _ = module.online.forward(r, [0, 1])
    assert torch.allclose(logps, ours[r.rows_of([0, 1])], atol=1e-5)  # the training forward too


# ---------------------------------------------------------------- 5. loss and accumulation
class _Capture:
    """Stands in for the optimiser in OnlineRL.train: keeps each optimiser step's gradients."""

    def __init__(self, module):
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.grads: list[dict[str, torch.Tensor]] = []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.params if p.grad is not None})

    def zero_grad(self):
        for _, p in self.params:
            p.grad = None


def _train_manually(module, rollouts, accumulation):
    """OnlineRL.train outside a Trainer: the backward losses and each optimiser step's gradients."""
    module.online.accumulation = accumulation
    opt, losses = _Capture(module), []
    module.optimizers = lambda: opt
    module.lr_schedulers = lambda: None

    def backward(loss):
        losses.append(loss.detach())
        loss.backward()

    module.manual_backward = backward
    with pytest.warns(UserWarning, match="self.log"):
        module.online.train(rollouts, module.policy_loss)
    return torch.stack(losses), opt.grads


@pytest.mark.parametrize("cls, kw", [(GRPO, {"norm": "dapo", "beta": 0.05}), (GRPO, {"norm": "grpo"}), (GSPO, {})],
                         ids=["grpo-dapo-kl", "grpo-grpo", "gspo"])  # fmt: skip
def test_loss_is_the_loss_function_and_accumulation_does_not_change_gradients(cls, kw, synthetic_dir):
    module = _module(cls, max_grad_norm=None, **kw)
    dm = _dm(module.backbone.processor, synthetic_dir)
    batch = _batch(dm)
    r = _rollout(module, batch)
    plain = _plain_logps(module.backbone.model, dm, r, batch["rows"])
    mask = r.completion_mask
    gen = torch.Generator().manual_seed(0)
    noise = 0.3 if cls is GRPO else 2e-4  # inside and outside the clip range (GSPO clips at ~3e-4)
    r.old_logps = (plain + noise * torch.randn(plain.shape, generator=gen)) * mask
    if kw.get("beta"):
        r.ref_logps = (plain + 0.3 * torch.randn(plain.shape, generator=gen)) * mask
    assert r.advantages.abs().sum() > 0
    if cls is GRPO:
        want, metrics = grpo_loss(plain, r.old_logps, r.advantages, mask, beta=kw.get("beta", 0.0),
                                  ref_logps=r.ref_logps, norm=kw["norm"], max_completion_length=NEW)  # fmt: skip
        assert 0 < metrics["clip/low"] + metrics["clip/high"] < 1  # some tokens clipped, some not
    else:
        want, _ = gspo_loss(plain, r.old_logps, r.advantages, mask)
    results = [_train_manually(module, [r], acc) for acc in (1, 2)]
    (l1, g1), (l2, g2) = results
    assert len(l1) == 1 and len(l2) == 2 and len(g1) == len(g2) == 1  # one optimiser step either way
    assert torch.allclose(l1.sum(), want, atol=1e-5) and torch.allclose(l2.sum(), want, atol=1e-5)
    assert g1[0].keys() == g2[0].keys() and any(g.abs().max() > 0 for g in g1[0].values())
    for name, g in g1[0].items():
        assert torch.allclose(g, g2[0][name], atol=1e-6, rtol=1e-4), name


# ---------------------------------------------------------------- 6. training
@pytest.mark.parametrize(
    "cls, lora", [(GRPO, None), (GSPO, LoraSettings(r=4, dropout=0.0))], ids=["grpo-full", "gspo-lora"]
)
def test_training_moves_trainable_weights_only_and_keeps_the_reference(cls, lora, synthetic_dir):
    # Two optimiser steps per rollout (LoRA's A matrices first move on the second, once B is non-zero).
    extra = {"mini_batches": 2} if cls is GSPO else {"num_iterations": 2}
    module = _module(cls, lora=lora, beta=0.1, lr=1e-3, **extra)
    bb = module.backbone
    assert (bb._reference is not None) == (lora is None)
    dm = _dm(bb.processor, synthetic_dir)
    fixed = _rollout(module, _batch(dm))
    with bb.reference() as ref:
        ref_before = module.online.logps(fixed, model=ref)
    policy_before = module.online.logps(fixed)
    before = _snapshot(module)
    ref_weights = {n: p.detach().clone() for n, p in bb._reference.named_parameters()} if lora is None else {}
    spy = Spy()
    trainer = _fit(module, synthetic_dir, [_callback(), spy], steps=2)
    assert len(spy.rollouts) == 1 and all(
        r.old_logps is not None and r.ref_logps is not None for (r,) in spy.rollouts
    )
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    tower = {id(p) for p in bb.vision_tower.parameters()}
    for name, p in module.named_parameters():
        assert (not torch.equal(before[name], p)) == p.requires_grad, name
        assert not (p.requires_grad and id(p) in tower), name  # vision: frozen
    if lora is None:
        assert all(torch.equal(p, ref_weights[n]) for n, p in bb._reference.named_parameters())
    with bb.reference() as ref:
        assert torch.allclose(module.online.logps(fixed, model=ref), ref_before, atol=1e-6)
    assert not torch.allclose(module.online.logps(fixed), policy_before, atol=1e-4)  # the policy moved


# ---------------------------------------------------------------- 7. dynamic sampling
class FirstBatchHalfFlat:
    """First call (the step's batch): prompt 1's group is flat. Later calls (refills): all informative."""

    __name__ = "first_batch_half_flat"

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, completions, completion_ids, group, **row):
        self.calls += 1
        varied = token_reward(prompts, completions, completion_ids)
        return [1.0 if (self.calls == 1 and g == 1) else v for v, g in zip(varied, group, strict=True)]


def test_dynamic_sampling_keeps_exactly_b_informative_groups(synthetic_dir):
    module = _module(GRPO, lr=1e-3)
    reward = FirstBatchHalfFlat()
    calls = _count_calls(module)
    spy = Spy()
    trainer = _fit(module, synthetic_dir, [_callback(rewards=(reward,), dynamic_sampling=True), spy])
    (rollouts,) = spy.rollouts
    assert len(rollouts) == 2 and reward.calls == 2  # the batch (1 informative group) and one refill (2)
    spread = [(r.rewards.view(-1, G).std(1) > 0).tolist() for r in rollouts]
    assert spread == [[True, False], [True, True]]
    groups = [r.keep.view(-1, G) for r in rollouts]
    assert all((g == g[:, :1]).all() for g in groups)  # whole groups are kept or dropped
    kept = [g[:, 0].tolist() for g in groups]
    assert kept == [[True, False], [True, False]]  # flat group dropped; one informative group over budget
    m = trainer.callback_metrics
    assert m["rollout/refills"] == 1 and m["rollout/kept_groups"] == B
    assert [c[0] for c in calls["lm"] if c[2]] == [B * G, B * G]  # one training forward per rollout
    # Dropped samples carry no gradient, even the over-budget group whose advantages are not zero.
    dropped = rollouts[1].advantages.view(-1, G)[1]
    assert dropped.abs().sum() > 0
    online = module.online
    params = [p for p in module.parameters() if p.requires_grad]

    def grads():
        step = online.chunks(G)[0]
        total = online._denominator(rollouts, step)
        losses = [online._chunk_loss(r, s, module.policy_loss, total, 2)[0] for r in rollouts for s in step]
        return torch.autograd.grad(sum(losses), params, allow_unused=True)

    def same(a, b):
        return all(
            (x is None and y is None) or torch.allclose(x, y, atol=1e-7) for x, y in zip(a, b, strict=True)
        )

    base = grads()
    for r in rollouts:
        r.advantages = torch.where(r.keep, r.advantages, torch.randn_like(r.advantages) * 10)
    assert same(base, grads())
    for r in rollouts:
        r.advantages = torch.where(r.keep, r.advantages, 0.0)
    assert same(base, grads())
    rollouts[1].advantages[0] += 1.0  # a kept sample: control
    assert not same(base, grads())


# ---------------------------------------------------------------- 8. bad input
def _broken(prompts, completions, **row):
    raise ValueError("boom")


def _nan_at_5(prompts, completions, **row):
    return [math.nan if i == 5 else 0.0 for i in range(len(completions))]


@pytest.fixture(scope="module")
def plain_grpo():
    return _module(GRPO)


def test_reward_errors_name_the_function(plain_grpo, synthetic_dir):
    batch = _batch(_dm(plain_grpo.backbone.processor, synthetic_dir))
    with pytest.raises(RuntimeError, match=r"reward function _broken raised.*boom"):
        _callback(rewards=(_broken,)).rollout(plain_grpo, batch)
    with pytest.raises(RuntimeError, match=r"reward function _nan_at_5 returned nan for sample 5"):
        _callback(rewards=(_nan_at_5,)).rollout(plain_grpo, batch)


def test_reward_that_raises_names_the_sample(plain_grpo, synthetic_dir):
    def numeric(prompts, completions, answer, **row):
        return [float(a) for a in answer]  # raises on the first non-numeric answer

    batch = _batch(_dm(plain_grpo.backbone.processor, synthetic_dir))
    answers = [a for a in batch["columns"]["answer"] for _ in range(G)]
    first_bad = next(i for i, a in enumerate(answers) if not a.replace(".", "").isdigit())
    with pytest.raises(
        RuntimeError,
        match=rf"numeric raised on this batch of {len(answers)} completions, at sample {first_bad} ",
    ):
        _callback(rewards=(numeric,)).rollout(plain_grpo, batch)


def test_bad_settings_fail_clearly(synthetic_dir):
    with pytest.raises(ValueError, match="num_generations must be at least 2 for GRPO"):
        _fit(_module(GRPO), synthetic_dir, [_callback(num_generations=1)])
    module = _module(GRPO, mini_batches=3)
    with pytest.raises(ValueError, match=r"rollout.num_generations \(4\) must be divisible by model.mini_batches "
                                         r"x model.accumulation \(3 x 1\)"):  # fmt: skip
        _fit(module, synthetic_dir, [_callback()])
    module = _module(GRPO)
    with pytest.raises(ValueError, match="online objectives need a lightning_vlm.rollout.RolloutCallback"):
        _fit(module, synthetic_dir, [])


# ---------------------------------------------------------------- 9. samples table
def test_samples_table_rows(grpo_run, synthetic_dir):
    lines = (grpo_run["root"] / "samples.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    (r,) = grpo_run["spy"].rollouts[0]
    assert len(records) == B * G
    assert [rec["completion"] for rec in records] == r.texts
    rewards = torch.tensor([rec["reward"] for rec in records])
    assert torch.allclose(rewards, r.rewards)
    for rec in records:
        parts = [rec["token_reward"], rec["even_prompts"]]
        assert rec["reward"] == pytest.approx(sum(v for v in parts if v is not None))
    assert [rec["even_prompts"] is None for rec in records] == [s // G % 2 == 1 for s in range(B * G)]
    want = group_advantages(rewards, G)[0]
    assert torch.allclose(torch.tensor([rec["advantage"] for rec in records]), want, atol=1e-5)
    assert want.abs().sum() > 0
    images = grpo_run["batches"].images[0]
    for rec in records:
        prompt_images = images[rec["sample"] // G]
        assert len(rec["images"]) == len(prompt_images) >= 1
        for path, image in zip(rec["images"], prompt_images, strict=True):
            assert Path(path).is_file()
            saved = Image.open(path).convert("RGB")
            assert saved.size == image.size and saved.tobytes() == image.convert("RGB").tobytes()


# ---------------------------------------------------------------- 10. MoE
def test_gspo_router_aux_loss_trains_the_routers(synthetic_dir):
    module = _module(GSPO, family="qwen3_vl_moe", router_aux_coef=0.01, lr=1e-2)
    before = _snapshot(module)
    flat = lambda prompts, completions, **row: [1.0] * len(completions)  # noqa: E731 - no advantage at all
    trainer = _fit(module, synthetic_dir, [_callback(rewards=(flat,))])
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


# ---------------------------------------------------------------- 12. validation
def test_validation_scores_greedy_answers(grpo_run, synthetic_dir):
    module = grpo_run["module"]
    bb = module.backbone
    eos, pad = bb.tokenizer.eos_token_id, bb.tokenizer.pad_token_id
    generate = bb.generate

    def ending_early(*args, **kw):  # prompt 0's answer ends after two tokens, as a trained model's might
        out = generate(*args, **kw).clone()
        out[0, 1], out[0, 2:] = eos, pad
        return out

    bb.generate = ending_early
    dm = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"),
                          val=str(synthetic_dir / "prompt_val.jsonl"), batch_size=B)  # fmt: skip
    validator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1,
                          callbacks=[grpo_run["callback"]])  # fmt: skip
    try:
        (metrics,) = validator.validate(module, dm, verbose=False)
    finally:
        del bb.generate
    val = dm.val_dataloader()
    batch = next(iter(val))
    ids = ending_early(batch["input_ids"], batch["attention_mask"], batch["vision"], max_new_tokens=NEW)
    mask, _ = completion_mask(ids, eos)
    kept = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    assert [len(k) for k in kept] == [2, NEW]
    texts = bb.decode(ids)
    tokens = token_reward(batch["prompts"], texts, kept)
    lengths = even_prompts(batch["prompts"], texts, kept, group=[0, 1])
    assert lengths == [2.0, None]  # the answer's tokens up to its EOS, as in the rollout
    assert metrics["val/rewards/token_reward"] == pytest.approx(sum(tokens) / B)
    assert metrics["val/rewards/even_prompts"] == pytest.approx(lengths[0])
    assert metrics["val/reward"] == pytest.approx((tokens[0] + tokens[1] + lengths[0]) / B)


def test_samples_table_goes_to_wandb_every_rollout(tmp_path, synthetic_dir):
    from lightning.pytorch.loggers import WandbLogger

    module = GSPO(BackboneConfig(tiny=TinyVLM()), mini_batches=2)  # 2 optimiser steps per rollout
    data = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"), batch_size=2)
    logger = WandbLogger(project="tables", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[_callback(table_every_n_steps=1)],
    )  # fmt: skip
    trainer.fit(module, data)
    import wandb

    wandb.finish()
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/rollout/samples_*.table.json"))
    assert len(tables) == 3  # one per rollout
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 3 * 2 * G


# ---------------------------------------------------------------- per-prompt seeds
def test_seeded_sampling_draws_from_the_softmax():
    """Gumbel-max with per-row generators is an exact draw from softmax(scores): 20,000 rows, one
    seed each, against the probabilities (3 standard errors)."""
    from lightning_vlm.generation import SeededSampling

    scores = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    n = 20_000
    draws = SeededSampling(list(range(n)), torch.device("cpu"))(None, scores.expand(n, -1)).argmax(-1)
    freq = torch.bincount(draws, minlength=5).double() / n
    p = scores.double().softmax(-1)
    assert freq[4] == 0  # a filtered token is never drawn
    assert ((freq - p).abs() <= 3 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)


def test_per_prompt_seeds_make_a_prompts_samples_independent_of_its_batch(synthetic_dir):
    module = _module(GRPO)
    _sharpen(module.backbone.model, 2.0)  # less uniform logits: distinct samples per prompt
    dm = _dm(module.backbone.processor, synthetic_dir)
    callback = _callback(per_prompt_seeds=True, temperature=0.7, top_k=50)
    both = callback.rollout(module, _batch(dm, n=2))  # rows 0 and 1
    alone = callback.rollout(module, _batch(dm, n=1, start=1))  # row 1 in a batch of its own
    assert torch.equal(alone.completion_ids, both.completion_ids[G:])  # row 1's G samples, unchanged
    assert not torch.equal(both.completion_ids[:G], both.completion_ids[G:])
    callback.rollouts += 1  # the next rollout draws anew
    assert not torch.equal(callback.rollout(module, _batch(dm, n=1, start=1)).completion_ids, alone.completion_ids)
