"""Preference pairs (shared by DPO and MPO, and the reward model's training): vision once per pair,
text-only pairs, trainable weights move while frozen weights and the reference stay, reference
log-probs precomputed once equal the live ones."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM, VLMBackbone
from lightning_vlm.data import PreferenceDataModule
from lightning_vlm.objectives import DPO, MPO, RewardModel
from tests.helpers.preference import first_batch, fit_pairs, pref_dm

# ---------------------------------------------------------------- vision once


def _count_tower(backbone: VLMBackbone) -> list[int]:
    """Patches fed to the vision tower, one entry per call."""
    seen: list[int] = []
    backbone.vision_tower.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("vision", ["frozen", "train"])
def test_vision_tower_runs_once_per_pair(vision, synthetic_dir):
    """Per training step: frozen tower -> one call shared by chosen, rejected and the reference;
    trained tower -> one policy call and one reference call. Each call sees the B prompts' images
    once; encoding per sequence (vision_once: false) feeds twice the patches to each call."""
    module = DPO(BackboneConfig(tiny=TinyVLM(), vision=vision), lr=1e-3)
    module.configure_model()
    calls = _count_tower(module.backbone)
    ref_calls = _count_tower_ref(module)
    fit_pairs(module, synthetic_dir, steps=1, limit_val_batches=0)
    per_call = calls[0]
    assert len(calls) + len(ref_calls) == (1 if vision == "frozen" else 2)
    assert all(c == per_call for c in calls + ref_calls)

    baseline = DPO(BackboneConfig(tiny=TinyVLM(), vision=vision), lr=1e-3)
    baseline.configure_model()
    b_calls, b_ref = _count_tower(baseline.backbone), _count_tower_ref(baseline)
    dm = PreferenceDataModule(train=str(synthetic_dir / "pref_train.jsonl"), batch_size=4, vision_once=False)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False).fit(baseline, dm)  # fmt: skip
    assert len(b_calls) + len(b_ref) == 2 and b_calls[0] == 2 * per_call


def _count_tower_ref(module) -> list[int]:
    ref = module.backbone._reference
    seen: list[int] = []
    VLMBackbone._vision_of(ref).register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen


def test_pairs_without_images(tmp_path):
    """Text-only pairs (the processor still returns mm_token_type_ids) take the plain path."""
    source = tmp_path / "text.jsonl"
    rows = [{"images": [], "prompt": "Say a colour.", "chosen": "red", "rejected": "blue"},
            {"images": [], "prompt": "Say a shape.", "chosen": "circle", "rejected": "square"}]  # fmt: skip
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = DPO(BackboneConfig(tiny=TinyVLM()))
    module.configure_model()
    dm = pref_dm(module.backbone.processor, source, batch_size=2)
    batch = first_batch(dm)
    assert "pixel_values" not in batch["vision"]
    loss, metrics = module._loss(batch)
    assert torch.isfinite(loss) and metrics["rewards/accuracies"].item() == 0.0  # policy == reference
    loss.backward()


def test_vision_once_gives_the_same_loss_and_gradients(synthetic_dir):
    torch.manual_seed(0)
    module = DPO(BackboneConfig(tiny=TinyVLM(), vision="train"))
    module.configure_model()
    results = []
    for once in (True, False):
        dm = pref_dm(module.backbone.processor, synthetic_dir / "pref_train.jsonl", vision_once=once)
        loss, metrics = module._loss(first_batch(dm))
        grads = torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad])
        results.append((loss, metrics, grads))
    (l1, m1, g1), (l2, m2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-6)
    assert torch.allclose(m1["logps/chosen"], m2["logps/chosen"], atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g2, strict=True))


# ---------------------------------------------------------------- training


def snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("cls", [DPO, MPO, RewardModel])
@pytest.mark.parametrize("lora", [None, LoraSettings(r=4)], ids=["full", "lora"])
def test_trainable_weights_move_frozen_and_reference_stay(cls, lora, family, synthetic_dir):
    torch.manual_seed(0)
    module = cls(BackboneConfig(tiny=TinyVLM(family=family), lora=lora), lr=1e-3)
    module.configure_model()
    before = snapshot(module)
    ref = module.backbone._reference
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()} if ref is not None else {}
    assert (ref is not None) == (cls is not RewardModel and lora is None)
    fit_pairs(module, synthetic_dir, steps=2)
    for name, p in module.named_parameters():
        assert (not torch.equal(before[name], p)) == p.requires_grad, name
    assert all(torch.equal(p, ref_before[n]) for n, p in (ref.named_parameters() if ref is not None else []))
    if lora is not None and cls is not RewardModel:  # the reference is the base: adapters off
        batch = first_batch(pref_dm(module.backbone.processor, synthetic_dir / "pref_train.jsonl"))
        fresh = cls(BackboneConfig(tiny=TinyVLM(family=family)))
        fresh.configure_model()
        with torch.no_grad():
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(
                module.pairs.reference(batch), fresh.pairs.policy(batch)[0], strict=True))  # fmt: skip


def test_precomputed_reference_logps_equal_the_live_ones(synthetic_dir):
    torch.manual_seed(0)
    live = DPO(BackboneConfig(tiny=TinyVLM()), lr=1e-3)
    torch.manual_seed(0)
    cached = DPO(BackboneConfig(tiny=TinyVLM()), lr=1e-3, precompute_ref_logps=True)
    fit_pairs(live, synthetic_dir, steps=2)
    trainer = fit_pairs(cached, synthetic_dir, steps=2)
    assert set(cached.pairs.cache) == {"train", "val"}
    assert len(cached.pairs.cache["train"]) == len(trainer.datamodule.datasets["train"])
    assert cached.backbone._reference is None  # released: training needed no reference forward
    batch = first_batch(pref_dm(live.backbone.processor, synthetic_dir / "pref_train.jsonl"))
    want = live.pairs.reference(batch)  # the live reference (still the initial weights)
    got = cached.pairs.reference(batch)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got, strict=True))
    trained = {n: p for n, p in live.named_parameters()}
    assert all(torch.allclose(p, trained[n], atol=1e-5) for n, p in cached.named_parameters())
    assert cached.pairs.sources["train"].endswith("pref_train.jsonl (48 rows)")
    batch["rows"] = [10_000]  # not cached, and no reference left to score it
    with pytest.raises(RuntimeError, match=r"split 'train': rows \[10000\] have no precomputed .* released"):
        cached.pairs.reference(batch)
