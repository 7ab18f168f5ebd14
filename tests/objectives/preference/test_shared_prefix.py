"""Shared prefix for preference pairs: each pair's prompt (with its images) runs once and the chosen and rejected
responses run on its KV cache. Sequence log-probs, the objectives' losses, the reward model's scores and every
trainable gradient equal the per-sequence path (float32: atol 1e-4 on summed log-probs, gradients within
1e-5 + 1e-4 of each gradient's largest entry), for every tiny family with a frozen and a trained tower."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM
from lightning_vlm.model.prefix import common_prefix
from lightning_vlm.model.tiny import FAMILIES
from lightning_vlm.objectives import DPO, MPO, RewardModel
from lightning_vlm.objectives.preference.pairs import PairLogps
from tests.helpers.preference import first_batch, pref_dm
from tests.model.test_families import backbones  # noqa: F401 (a fixture)
from tests.model.test_prefix import _assert_same_grads, _checkpointed


def _batch(processor, synthetic_dir, **kw) -> dict:
    """The first 4 synthetic pairs (one and two images), their responses lengthened unevenly so that chosen and
    rejected of a pair pad differently and their positions differ from the per-sequence layout's."""
    out = synthetic_dir.parent / "pref_uneven.jsonl"
    if not out.exists():
        rows = [json.loads(line) for line in (synthetic_dir / "pref_train.jsonl").read_text().splitlines()[:4]]
        for k, row in enumerate(rows):
            row["images"] = [str(synthetic_dir / im) for im in row["images"]]
            reply = row["rejected" if k % 2 else "chosen"][0]["content"][0] if k < 3 else {"text": ""}
            reply["text"] += " because that is what I see in the picture"[: 12 * (k + 1)]
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = first_batch(pref_dm(processor, out, **kw))
    B, lengths = len(batch["rows"]), batch["attention_mask"].sum(-1)
    assert B == 4 and (lengths[:3] != lengths[B : B + 3]).all()  # chosen and rejected pad differently
    return batch


def _pairs_and_grads(pairs: PairLogps, batch: dict) -> tuple:
    params = [p for p in pairs.backbone.model.parameters() if p.requires_grad]
    (c, r), (logps, scored), _ = pairs.policy(batch)
    grads = torch.autograd.grad((c * torch.arange(1.0, 1 + len(c)) - 0.5 * r).sum(), params, allow_unused=True)
    return c, r, logps, scored, grads


@pytest.mark.parametrize("vision", ["frozen", "train"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pair_logps_and_gradients_equal_per_sequence(family, vision, backbones, synthetic_dir):  # noqa: F811
    bb = backbones(family, vision)
    batch = _batch(bb.processor, synthetic_dir)
    shared, plain = PairLogps(bb, shared_prefix=True), PairLogps(bb, shared_prefix=False)
    (inputs, _), ids = shared.split(batch), batch["input_ids"]
    assert inputs[0].numel() + inputs[2].numel() < 0.75 * ids.numel()  # the prompts run once: fewer tokens
    a, b = _pairs_and_grads(plain, batch), _pairs_and_grads(shared, batch)
    assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1], b[1], atol=1e-4), (a[0] - b[0], a[1] - b[1])
    assert a[3].sum() == b[3].sum() and (b[2][b[3].bool()] < 0).all()  # the same tokens are scored
    _assert_same_grads(a[4], b[4])


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "qwen3_5"])
def test_pair_logps_under_activation_checkpointing(family, backbones, synthetic_dir):  # noqa: F811
    bb = backbones(family, "train")
    batch = _batch(bb.processor, synthetic_dir)
    a = _pairs_and_grads(PairLogps(bb, shared_prefix=False), batch)
    with _checkpointed(bb, True) as calls:
        b = _pairs_and_grads(PairLogps(bb, shared_prefix=True), batch)
    assert calls[0] > 0 and torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1], b[1], atol=1e-4)
    _assert_same_grads(a[4], b[4])


def _losses_and_grads(module, batch: dict) -> tuple:
    loss, metrics = module._loss(batch)
    params = [p for p in module.parameters() if p.requires_grad]
    return loss, module.pair_scores, torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize(
    "cls, kw",
    [(DPO, {}), (DPO, {"loss_type": "ipo"}), (MPO, {}), (RewardModel, {"center_coef": 0.01})],
    ids=["dpo", "ipo", "mpo", "rm"],
)
@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, dropout=0.0)], ids=["full", "lora"])
def test_objective_losses_and_gradients_equal_per_sequence(cls, kw, lora, synthetic_dir):
    """Policy, reference (frozen copy, or disabled adapters), DPO/IPO/MPO losses and the reward model's scores."""
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        module = cls(BackboneConfig(tiny=TinyVLM(), vision="train", lora=lora), shared_prefix=on, **kw)
        module.configure_model()
        with torch.no_grad():  # a policy away from its reference (and LoRA adapters that do something)
            for name, p in module.backbone.model.named_parameters():
                if p.requires_grad and ("lora_B" in name or lora is None):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
        batch = _batch(module.backbone.processor, synthetic_dir)
        assert (module.pairs.split(batch) is not None) == on
        results.append(_losses_and_grads(module, batch))
    (la, sa, ga), (lb, sb, gb) = results
    assert torch.allclose(la, lb, atol=1e-5) and la != 0, (la, lb)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(sa, sb, strict=True))
    assert not torch.allclose(sa[0], torch.zeros_like(sa[0]))  # policy != reference: the scores say something
    _assert_same_grads(ga, gb)


def test_fallbacks_say_each_reason_once_and_the_split_runs_once_per_batch(synthetic_dir, monkeypatch):
    module = DPO(BackboneConfig(tiny=TinyVLM()))
    module.configure_model()
    plain = _batch(module.backbone.processor, synthetic_dir, vision_once=False)
    with pytest.warns(UserWarning, match="scored per sequence") as seen:
        for _ in range(2):  # the same reason twice, on two batches
            assert module.pairs.split(dict(plain)) is None
        right = _batch(module.backbone.processor, synthetic_dir)
        right["attention_mask"] = right["attention_mask"].flip(-1)  # another reason: said too
        assert module.pairs.split(right) is None
    assert [str(w.message).split(": ", 1)[1] for w in seen] == ["vision_once is off", "sequence 0 is not left-padded"]
    loss, _ = module._loss(plain)
    assert torch.isfinite(loss)
    calls = []
    monkeypatch.setattr("lightning_vlm.objectives.preference.pairs.common_prefix",
                        lambda *a: calls.append(1) or common_prefix(*a))  # fmt: skip
    module._loss(_batch(module.backbone.processor, synthetic_dir))
    assert calls == [1]  # the policy's and the reference's pass share one split


def test_common_prefix_cuts_before_the_first_scored_token_of_either_response():
    """Two pairs, left-padded; pair 0's rejected response starts like its chosen one (the shared tokens are
    scored, so they are not prompt); the prompt holds the tokens before the earliest scored one."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 10, 11, 12], [0, 5, 6, 7, 8, 13, 14], [0, 0, 1, 2, 3, 4, 15]])
    mask = (ids != 0).long()
    labels = torch.zeros_like(mask, dtype=torch.bool)
    labels[0, 5:], labels[1, 5:], labels[2, 4:], labels[3, 6:] = True, True, True, True
    vision = {"mm_token_type_ids": torch.arange(28).reshape(4, 7) * mask, "pixel_values": torch.ones(3)}
    (p, pm, c, cm, v), targets = common_prefix(ids, mask, labels, vision, 2)
    assert p.tolist() == [[0, 5, 6, 7], [1, 2, 3, 4]] and pm.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert c.tolist() == [[8, 9, 0], [10, 11, 12], [8, 13, 14], [15, 0, 0]]
    assert cm.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]]
    assert targets.int().tolist() == [[1, 1, 0], [0, 1, 1], [1, 1, 1], [1, 0, 0]]
    assert v["mm_token_type_ids"].tolist() == [[0, 2, 3, 4], [7, 8, 9, 10]]
    assert v["pixel_values"] is vision["pixel_values"]


@pytest.mark.parametrize(
    "change, why",
    [("right", "sequence 0 is not left-padded"), ("empty", "sequence 1 has no scored token"),
     ("labels", "sequence 1 has no token before its first scored token"),
     ("prompt", "sequence 1 differs from its pair's first sequence before the first scored token")],
)  # fmt: skip
def test_common_prefix_says_why_it_cannot(change, why):
    ids = torch.tensor([[0, 5, 6, 7], [5, 6, 8, 9]])
    mask, labels = (ids != 0).long(), torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]]).bool()
    assert not isinstance(common_prefix(ids, mask, labels, {}, 2), str)  # as is, it applies
    if change == "right":
        ids, mask = ids.flip(-1), mask.flip(-1)
    if change == "prompt":
        ids[1, 1] = 4
    if change in ("labels", "empty"):
        labels[1] = change == "labels"
    assert common_prefix(ids, mask, labels, {}, 2) == why


def test_common_prefix_declines_when_padding_would_cost_more_than_it_saves():
    """Pair 0: a 5-token prompt and 1-token responses; pair 1: a 1-token prompt and 5-token responses. Shared,
    prompts pad to 5 and responses to 5: 2 x 5 + 4 x 5 = 30 tokens against 4 x 6 = 24 in full."""
    ids = torch.tensor([[5, 5, 5, 5, 5, 7], [3, 9, 9, 9, 9, 9], [5, 5, 5, 5, 5, 8], [3, 8, 8, 8, 8, 8]])
    labels = torch.tensor([[0] * 5 + [1], [0] + [1] * 5] * 2).bool()
    why = "the shared prefix would run 30 tokens, the full sequences 24"
    assert common_prefix(ids, torch.ones_like(ids), labels, {}, 2) == why
    assert not isinstance(common_prefix(ids[[0, 2]], torch.ones(2, 6, dtype=torch.long), labels[[0, 2]], {}, 2), str)  # alone: shared
