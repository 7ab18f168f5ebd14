"""Shared helpers of the preference tests: a datamodule on one source, its first training batch, and a
short fit on the synthetic pairs."""

from __future__ import annotations

import lightning as L

from lightning_vlm.data import PreferenceDataModule


def pref_dm(processor, source, **kw) -> PreferenceDataModule:
    dm = PreferenceDataModule(train=str(source), batch_size=kw.pop("batch_size", 4), **kw)
    dm.processor = processor
    dm.setup("fit")
    return dm


def first_batch(dm) -> dict:
    return next(iter(dm._loader("train", dm._collator("train"), shuffle=False)))


def fit_pairs(module, synthetic_dir, steps=2, callbacks=(), **trainer):
    dm = PreferenceDataModule(
        train=str(synthetic_dir / "pref_train.jsonl"), val=str(synthetic_dir / "pref_val.jsonl"), batch_size=4
    )
    trainer = {"limit_val_batches": 1, **trainer}
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                        **trainer)  # fmt: skip
    trainer.fit(module, dm)
    return trainer
