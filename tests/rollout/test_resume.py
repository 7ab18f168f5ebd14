"""An interrupted online-RL run resumes where it stopped: same sampled completions, same weights."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.data import PromptDataModule
from lightning_vlm.model.tiny import ensure_tiny_vlm
from lightning_vlm.objectives import GRPO
from lightning_vlm.objectives.online import OnlineSettings
from lightning_vlm.rollout import RolloutCallback
from tests.helpers.online import Spy


def _even_tokens(prompts, completions, completion_ids, **row):
    return [sum(t % 2 == 0 for t in ids) / 4 for ids in completion_ids]


def _fit(tmp, synthetic_dir, max_steps: int, ckpt_path=None):
    L.seed_everything(0)
    model = GRPO(BackboneConfig(tiny=TinyVLM()), lr=1e-3, loop=OnlineSettings(mini_batches=2))
    data = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"), batch_size=2)
    record = Spy()  # every rollout the objective receives
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=[
            RolloutCallback(
                num_generations=4, max_new_tokens=4, rewards=[_even_tokens], table_every_n_steps=0
            ),
            record,
            ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, every_n_train_steps=2),
        ],
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, [r.completion_ids for (r,) in record.rollouts]


def test_resumed_run_samples_and_ends_like_the_uninterrupted_one(tmp_path, synthetic_dir):
    ensure_tiny_vlm(TinyVLM())  # built before the runs: building it draws no random numbers in one of them
    full, full_seen = _fit(tmp_path / "full", synthetic_dir, max_steps=6)  # 3 rollouts x 2 optimiser steps
    _, first_seen = _fit(tmp_path / "cut", synthetic_dir, max_steps=2)
    resumed, resumed_seen = _fit(
        tmp_path / "cut", synthetic_dir, max_steps=6, ckpt_path=tmp_path / "cut" / "ckpt" / "last.ckpt"
    )
    assert len(full_seen) == 3 and len(first_seen) == 1 and len(resumed_seen) == 2
    for k, (got, want) in enumerate(zip(first_seen + resumed_seen, full_seen, strict=True)):
        assert torch.equal(got, want), f"rollout {k}"  # the same completions were sampled
    a = dict(full.named_parameters())
    moved = 0
    for name, p in resumed.named_parameters():
        assert torch.allclose(p, a[name], atol=1e-6), name
        moved += p.requires_grad
    assert moved > 0
    start = GRPO(BackboneConfig(tiny=TinyVLM()))
    start.configure_model()
    initial = dict(start.named_parameters())
    assert any(not torch.equal(initial[n], p) for n, p in full.named_parameters() if p.requires_grad)
