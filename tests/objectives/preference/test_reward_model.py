"""The Bradley-Terry reward model: its export loads as a scorer, it reads the last real token, margins."""

from __future__ import annotations

import pytest
import torch

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM
from lightning_vlm.objectives import RewardModel
from tests.helpers.preference import first_batch, fit_pairs, pref_dm


def test_reward_model_export_loads_as_a_scorer(synthetic_dir, tmp_path):
    from lightning_vlm.export import ExportHF

    torch.manual_seed(0)
    module = RewardModel(BackboneConfig(tiny=TinyVLM(), lora=LoraSettings(r=4)), lr=1e-3)
    fit_pairs(module, synthetic_dir, steps=2, callbacks=[ExportHF(str(tmp_path / "rm"))], limit_val_batches=0)
    loaded = RewardModel.from_pretrained(str(tmp_path / "rm"))
    batch = first_batch(pref_dm(loaded.backbone.processor, synthetic_dir / "pref_val.jsonl"))
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["copies"])
    module.eval()
    with torch.no_grad():
        assert torch.allclose(module.scores(*args), loaded.scores(*args), atol=1e-5)
        fresh = RewardModel(BackboneConfig(tiny=TinyVLM()))
        fresh.configure_model()
        assert not torch.allclose(fresh.scores(*args), loaded.scores(*args), atol=1e-3)
    with pytest.raises(FileNotFoundError, match="not a reward model export"):
        RewardModel.from_pretrained(str(module.backbone.path))


def test_reward_model_reads_the_last_real_token_and_uses_margins(synthetic_dir, tmp_path):
    torch.manual_seed(0)
    module = RewardModel(BackboneConfig(tiny=TinyVLM()))
    module.configure_model()
    batch = first_batch(pref_dm(module.backbone.processor, synthetic_dir / "pref_train.jsonl"))
    with torch.no_grad():
        s = module.scores(batch["input_ids"], batch["attention_mask"], batch["vision"], batch["copies"])
        hidden = module.backbone.hidden_states(
            batch["input_ids"], batch["attention_mask"], batch["vision"], copies=2
        )
        assert torch.allclose(s, module.head(hidden[:, -1]).squeeze(-1), atol=1e-6)  # left padding
        plain, _ = module._loss(batch)
        batch["margin"] = [3.0] * len(batch["rows"])
        with_margin, _ = module._loss(batch)
    assert with_margin > plain
