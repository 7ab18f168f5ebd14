"""The shared objective base: optimiser/schedule settings, the non-finite-loss guard, SFT training."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

import lightning_vlm.objectives.sft as sft_module
from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.cli import VLMCLI
from lightning_vlm.data import SFTDataModule
from lightning_vlm.objectives import SFT
from lightning_vlm.objectives.base import _schedule


def test_schedules_hand_computed():
    cosine = _schedule("cosine", warmup=2, total=10)
    assert [round(cosine(s), 6) for s in (0, 1, 2)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0]
    assert math.isclose(cosine(6), 0.5, abs_tol=1e-9)  # halfway through the 8 decay steps
    assert math.isclose(cosine(10), 0.0, abs_tol=1e-9)
    linear = _schedule("linear", warmup=0, total=4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert _schedule("constant", warmup=0, total=4)(3) == 1.0


def test_optimizer_and_scheduler_from_the_command_line(synthetic_dir):
    cli = VLMCLI(
        args=[
            "--model", "lightning_vlm.objectives.SFT",
            "--model.init_args.backbone.tiny.family", "qwen2_vl",
            "--model.init_args.optimizer", "torch.optim.SGD",
            "--model.init_args.optimizer.init_args.lr", "0.5",
            "--model.init_args.lr_scheduler", "torch.optim.lr_scheduler.StepLR",
            "--model.init_args.lr_scheduler.init_args.step_size", "7",
            "--data", "lightning_vlm.data.SFTDataModule",
            "--data.init_args.train", str(synthetic_dir / "sft_train.jsonl"),
            "--trainer.logger", "false",
        ],
        run=False,
    )  # fmt: skip
    cli.model.configure_model()
    conf = cli.model.configure_optimizers()
    assert isinstance(conf["optimizer"], torch.optim.SGD) and conf["optimizer"].defaults["lr"] == 0.5
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert conf["lr_scheduler"]["scheduler"].step_size == 7
    trainable = {id(p) for p in cli.model.parameters() if p.requires_grad}
    assert {id(p) for g in conf["optimizer"].param_groups for p in g["params"]} == trainable


def _fit(module, synthetic_dir, steps):
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=8)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, dm)
    return trainer


def test_sft_trains_only_trainable_weights(synthetic_dir):
    torch.manual_seed(0)
    module = SFT(BackboneConfig(tiny=TinyVLM()), lr=1e-3)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _fit(module, synthetic_dir, steps=2)
    for name, p in module.named_parameters():
        moved = not torch.equal(before[name], p)
        assert moved == p.requires_grad, name  # trainable moved, frozen vision stayed


def test_nonfinite_loss_skips_the_step_and_repeated_ones_stop(synthetic_dir, monkeypatch):
    real = sft_module.sft_loss
    calls = {"n": 0}

    def flaky(logps, mask):
        calls["n"] += 1
        loss, metrics = real(logps, mask)
        return (loss * float("nan"), metrics) if calls["n"] == 2 else (loss, metrics)

    monkeypatch.setattr(sft_module, "sft_loss", flaky)
    torch.manual_seed(0)
    module = SFT(BackboneConfig(tiny=TinyVLM()), lr=1e-3)
    snapshots = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append(
                {n: p.detach().clone() for n, p in pl_module.trainable_named_parameters().items()}
            )

    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=8)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[Snap()])  # fmt: skip
    trainer.fit(module, dm)
    assert module.nonfinite_total == 1 and module.nonfinite_steps == 0
    assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])  # NaN step: no update
    assert not all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])  # next step trains
    assert all(torch.isfinite(p).all() for p in module.parameters())

    monkeypatch.setattr(
        sft_module, "sft_loss", lambda logps, mask: (logps.sum() * float("nan"), {"tokens": mask.sum()})
    )
    module = SFT(BackboneConfig(tiny=TinyVLM()), max_nonfinite_steps=3)
    with pytest.raises(RuntimeError, match="3 consecutive non-finite losses"):
        _fit(module, synthetic_dir, steps=10)


class _Norms(L.Callback):
    """The gradients' total 2-norm when the optimiser step starts (callbacks run before the module's hook,
    and Lightning clips after both)."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


def test_grad_norm_is_logged_before_clipping(synthetic_dir):
    torch.manual_seed(0)
    module, norms = SFT(BackboneConfig(tiny=TinyVLM()), lr=1e-3), _Norms()
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=8)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, gradient_clip_val=1e-4, callbacks=[norms])  # fmt: skip
    trainer.fit(module, dm)
    (want,) = norms.norms
    assert want > 1e-2  # far above the clip: a clipped norm would read 1e-4
    assert float(trainer.callback_metrics["train/grad_norm"]) == pytest.approx(want, rel=1e-4)
