"""DPO: label smoothing for the sigmoid loss only, the IPO and hinge variants against their formulas,
and predicted rows (DPO's implicit rewards, the reward model's scores)."""

from __future__ import annotations

import pytest
import torch

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.objectives import DPO, RewardModel
from tests.helpers.preference import first_batch, fit_pairs, pref_dm


def test_label_smoothing_is_for_the_sigmoid_loss_only():
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type 'sigmoid' only"):
        DPO(BackboneConfig(tiny=TinyVLM()), loss_type="ipo", label_smoothing=0.1)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_dpo_variants_train(loss_type, synthetic_dir):
    module = DPO(BackboneConfig(tiny=TinyVLM()), loss_type=loss_type, lr=1e-3)
    trainer = fit_pairs(module, synthetic_dir, steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    batch = first_batch(pref_dm(module.backbone.processor, synthetic_dir / "pref_train.jsonl"))
    with torch.no_grad():
        (c, r), (logps, mask), _ = module.pairs.policy(batch)
        loss, _ = module._loss(batch)
    assert mask.sum() == batch["labels_mask"].sum()  # the shared prefix scores the same tokens
    sums = logps.sum(-1)
    want = sums / mask.sum(-1) if loss_type == "ipo" else sums  # IPO: token means, as in its paper
    assert torch.allclose(torch.cat([c, r]), want, atol=1e-5)
    rc, rr = module.pairs.reference(batch)
    gap = (c - rc) - (r - rr)
    expected = ((gap - 1 / (2 * 0.1)) ** 2).mean() if loss_type == "ipo" else torch.relu(1 - 0.1 * gap).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def test_predict_rows(synthetic_dir):
    torch.manual_seed(0)
    dpo = DPO(BackboneConfig(tiny=TinyVLM()), beta=0.5)
    dpo.configure_model()
    batch = first_batch(pref_dm(dpo.backbone.processor, synthetic_dir / "pref_val.jsonl"))
    with torch.no_grad():
        rows = dpo.predict_step(batch, 0)
    assert [r["row"] for r in rows] == batch["rows"]
    assert all(r["reward_chosen"] == 0.0 and r["reward_rejected"] == 0.0 for r in rows)  # policy == reference
    with torch.no_grad():
        for p in dpo.trainable_named_parameters().values():  # the frozen tower stays as it is
            p.add_(0.01 * torch.randn_like(p))
        (c, r), _, _ = dpo.pairs.policy(batch)
        rc, rr = dpo.pairs.reference(batch)
        rows = dpo.predict_step(batch, 0)
    assert [x["reward_chosen"] for x in rows] == pytest.approx((0.5 * (c - rc)).tolist(), abs=1e-6)
    assert any(x["reward_rejected"] != 0.0 for x in rows)

    rm = RewardModel(BackboneConfig(tiny=TinyVLM()))
    rm.configure_model()
    with torch.no_grad():
        rows = rm.predict_step(batch, 0)
        s = rm.scores(batch["input_ids"], batch["attention_mask"], batch["vision"], batch["copies"])
    n = len(batch["rows"])
    assert [x["score_chosen"] for x in rows] == pytest.approx(s[:n].tolist(), abs=1e-6)
    assert [x["score_rejected"] for x in rows] == pytest.approx(s[n:].tolist(), abs=1e-6)
