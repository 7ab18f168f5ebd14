"""Sample tables: every tabled sample with its images, rewards and advantage, in samples.jsonl and as
a W&B table every rollout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.data import PromptDataModule
from lightning_vlm.losses import group_advantages
from lightning_vlm.objectives import GSPO
from lightning_vlm.objectives.online import OnlineSettings
from tests.helpers.online import B, G, rollout_callback


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
    want = group_advantages(rewards, G)[0]  # the objective's advantages, computed before the table
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


def test_samples_table_goes_to_wandb_every_rollout(tmp_path, synthetic_dir, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    elsewhere = tmp_path.parent / f"{tmp_path.name}_wandb_data"  # W&B's own data folder: not the run's
    monkeypatch.setenv("WANDB_DATA_DIR", str(elsewhere))

    module = GSPO(BackboneConfig(tiny=TinyVLM()), loop=OnlineSettings(mini_batches=2))  # 2 steps per rollout
    data = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"), batch_size=2)
    logger = WandbLogger(project="tables", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[rollout_callback(table_every_n_steps=1)],
    )  # fmt: skip
    trainer.fit(module, data)
    import wandb

    wandb.finish()
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/rollout/samples_*.table.json"))
    assert len(tables) == 3  # one per rollout
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 3 * 2 * G
    # The tables' images (W&B's staged copies, kept until a sync uploads them) are in the run folder.
    staged = [p.read_bytes()[:8] for p in (tmp_path / "wandb" / "artifacts" / "staging").iterdir()]
    assert staged.count(b"\x89PNG\r\n\x1a\n") >= 3
    assert not any(p.is_file() for p in elsewhere.rglob("*"))
    assert os.environ["WANDB_DATA_DIR"] == str(elsewhere)  # set back
