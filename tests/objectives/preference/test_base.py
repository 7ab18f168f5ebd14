"""The preference base: the held-out samples table of DPO, MPO and the reward model."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.data import PreferenceDataModule
from lightning_vlm.objectives import DPO, MPO, RewardModel
from tests.helpers.preference import first_batch, pref_dm


@pytest.mark.parametrize("objective", [DPO, MPO, RewardModel])
def test_validation_writes_a_samples_table(objective, tmp_path, synthetic_dir):
    from lightning.pytorch.loggers import WandbLogger

    torch.manual_seed(0)
    module = objective(BackboneConfig(tiny=TinyVLM()), lr=1e-3, table_rows=6)
    val = synthetic_dir / "pref_val.jsonl"
    dm = PreferenceDataModule(
        train=str(synthetic_dir / "pref_train.jsonl"), val=str(val), batch_size=4, eval_batch_size=3
    )
    logger = (
        WandbLogger(project="pref-table", save_dir=str(tmp_path), offline=True) if objective is DPO else False
    )
    trainer = L.Trainer(max_steps=2, val_check_interval=1, limit_val_batches=2, accelerator="cpu", logger=logger,
                        default_root_dir=str(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=1)  # fmt: skip
    trainer.fit(module, dm)
    records = [json.loads(line) for line in (tmp_path / "val_samples.jsonl").read_text().splitlines()]
    # Two validation batches of 3 fill the 6 rows; no sanity run.
    assert [(r["step"], r["row"]) for r in records] == [(s, k) for s in (1, 2) for k in range(6)]
    chosen, rejected = module.score_names
    kind = "score" if objective is RewardModel else "reward"
    assert (chosen, rejected) == (f"{kind}_chosen", f"{kind}_rejected")
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    for rec in records:
        row = rows[rec["row"]]
        assert rec["prompt"] == row["prompt"][-1]["content"][-1]["text"]
        assert (rec["chosen"], rec["rejected"]) == tuple(
            row[k][-1]["content"][0]["text"] for k in ("chosen", "rejected")
        )
        assert rec["margin"] == rec[chosen] - rec[rejected]
        assert len(rec["images"]) == len(row["images"]) >= 1
        for path, ref in zip(rec["images"], row["images"], strict=True):
            assert Path(path).parent == tmp_path / "samples"
            assert Image.open(path).tobytes() == Image.open(synthetic_dir / ref).convert("RGB").tobytes()
    last = records[6:]  # the last validation's rows: every row it scored
    key = "val/accuracy" if objective is RewardModel else "val/rewards/accuracies"
    logged = float(trainer.callback_metrics[key])
    assert logged == pytest.approx(sum(r["margin"] > 0 for r in last) / 6)
    assert any(r["margin"] != 0 for r in last)  # after two steps the policy left the reference
    # The scores are the objective's own (its predict rows on the same pairs, with the final weights).
    batch = first_batch(pref_dm(module.backbone.processor, val, batch_size=3))
    with torch.no_grad():
        predicted = module.predict_step(batch, 0)
    for rec, pred in zip(last, predicted, strict=False):
        assert rec["row"] == pred["row"]
        assert (rec[chosen], rec[rejected]) == pytest.approx((pred[chosen], pred[rejected]), abs=1e-5)
    if objective is DPO:
        import wandb

        wandb.finish()
        tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/val/samples_*.table.json"))
        assert len(tables) == 2  # one per validation
        columns = json.loads(tables[0].read_text())["columns"]
        assert columns == ["step", "row", "prompt", "chosen", "rejected", chosen, rejected, "margin", "image"]


def test_a_loss_that_keeps_no_pair_scores_is_named():
    module = DPO(BackboneConfig(tiny=TinyVLM()))
    module.pair_scores = (torch.ones(1), torch.zeros(1))  # an earlier batch's: never reused
    module._loss = lambda batch: (torch.zeros(()), {})
    with pytest.raises(NotImplementedError, match=r"DPO\._loss did not set pair_scores"):
        module.predict_step({"rows": [0]}, 0)
