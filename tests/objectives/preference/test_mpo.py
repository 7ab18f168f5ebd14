"""MPO: the BCO delta is the running mean of the step rewards, and the weights select its terms."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.objectives import MPO
from tests.helpers.preference import first_batch, fit_pairs, pref_dm


def test_mpo_delta_is_the_running_mean_of_step_rewards(synthetic_dir):
    seen: list[float] = []
    deltas: list[float] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/rewards/batch_mean"]))
            deltas.append(module.delta)

    module = MPO(BackboneConfig(tiny=TinyVLM()), lr=1e-3)
    fit_pairs(
        module, synthetic_dir, steps=3, callbacks=[Spy()], accumulate_grad_batches=2, limit_val_batches=0
    )
    steps = [(seen[0] + seen[1]) / 2, (seen[2] + seen[3]) / 2, (seen[4] + seen[5]) / 2]
    assert module.delta_count == 3
    assert deltas[0] == 0.0  # mid-step: not updated until the step's last micro-batch
    assert abs(deltas[1] - steps[0]) < 1e-6 and abs(deltas[3] - sum(steps[:2]) / 2) < 1e-6
    assert abs(module.delta - sum(steps) / 3) < 1e-6 and module.delta != 0.0


def test_mpo_weights_select_terms(synthetic_dir):
    batch = None
    for weights, active in (((1.0, 0.0, 0.0), "preference"), ((0.0, 0.0, 1.0), "generation")):
        torch.manual_seed(0)
        module = MPO(BackboneConfig(tiny=TinyVLM()), preference_weight=weights[0], quality_weight=weights[1],
                     generation_weight=weights[2])  # fmt: skip
        module.configure_model()
        batch = batch or first_batch(pref_dm(module.backbone.processor, synthetic_dir / "pref_train.jsonl"))
        loss, metrics = module._loss(batch)
        assert torch.allclose(loss, metrics[f"loss/{active}"])
        assert all(metrics[f"loss/{t}"] == 0 for t in ("preference", "quality", "generation") if t != active)
    with pytest.raises(ValueError, match="at least one of the MPO weights"):
        MPO(BackboneConfig(tiny=TinyVLM()), preference_weight=0, quality_weight=0, generation_weight=0)
