"""What a run shows: plain progress lines when stdout is not a terminal, the live bar in one, and bar
totals that stay sane after a resume and for online objectives (several optimiser steps per batch)."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.data import SFTDataModule
from lightning_vlm.objectives import SFT
from lightning_vlm.progress import ProgressLine, RichBar
from tests.helpers.online import build, fit, rollout_callback
from tests.test_cli import ROOT, _tiny_args


def _command(tmp_path, synthetic_dir, *extra: str) -> tuple[list[str], dict]:
    args = _tiny_args(tmp_path, synthetic_dir, "--trainer.enable_progress_bar", "true", *extra)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return [sys.executable, "-m", "lightning_vlm.cli", "fit", *args], env


def test_a_pipe_gets_a_plain_line_every_n_steps(tmp_path, synthetic_dir):
    """As under nohup, SLURM or CI: stdout is a pipe. No bar, a flushed line every N steps, and no
    bars of datasets' row checks or transformers' loading, no install tips, no third-party deprecations."""
    command, env = _command(tmp_path, synthetic_dir, "--progress_every_n_steps", "2")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = re.compile(r"step (\d)/4  loss [\d.]+  lr [\de.-]+  [\d,]+ tok/s  eta \d+:\d\d:\d\d")
    steps = [int(m.group(1)) for m in map(line.fullmatch, done.stdout.splitlines()) if m]
    assert steps == [2, 4], done.stdout
    assert re.search(r"^validation at step 2  val/accuracy [\d.]+  val/loss [\d.]+$", done.stdout, re.M)
    assert "Epoch" not in done.stdout + done.stderr  # no bar
    for noise in ("checking ", "Loading weights", "Writing model shards", "Tip:", "LeafSpec", "anonymous"):
        assert noise not in done.stderr, noise


def test_a_terminal_keeps_the_live_bar(tmp_path, synthetic_dir):
    """In a (pseudo-)terminal the rich bar stays, and says ``Epoch 0``, not ``Epoch 0/-2``."""
    command, env = _command(tmp_path, synthetic_dir, "--trainer.max_steps", "2")
    main, child = pty.openpty()
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=child, stderr=child, env=env, cwd=tmp_path
    )
    os.close(child)
    out, deadline = b"", time.monotonic() + 600
    while time.monotonic() < deadline:
        if select.select([main], [], [], 1)[0]:
            try:
                chunk = os.read(main, 1 << 16)
            except OSError:  # the child's side closed
                break
            if not chunk:
                break
            out += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0, out[-3000:]
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.decode(errors="replace"))
    assert re.search(r"Epoch 0 .* 2/2 ", text) and "/-2" not in text, text[-2000:]
    assert not re.search(r"^step \d", text, re.M)  # no plain lines


class _Totals(Callback):
    """(position, total) of the rich bar's training task after every batch."""

    def __init__(self):
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback
        (task,) = [t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id]
        self.seen.append((int(task.completed), task.total))
        assert str(task.description).strip() == f"Epoch {trainer.current_epoch}"


def _fit_sft(tmp, synthetic_dir, max_steps: int, ckpt_path=None) -> list[tuple[int, float]]:
    totals = _Totals()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_model_summary=False,
                        default_root_dir=tmp, callbacks=[RichBar(), totals, ModelCheckpoint(
                            dirpath=tmp / "ckpt", save_last=True, every_n_train_steps=2)])  # fmt: skip
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=16)  # 3 batches an epoch
    trainer.fit(SFT(BackboneConfig(tiny=TinyVLM())), dm, ckpt_path=ckpt_path)
    return totals.seen


def test_bar_total_after_a_mid_epoch_resume(tmp_path, synthetic_dir):
    """Lightning sized a resumed epoch's bar by the steps left alone (``3/0`` here, ``54/30`` in a long run)."""
    assert _fit_sft(tmp_path, synthetic_dir, 2) == [(1, 2), (2, 2)]
    resumed = _fit_sft(tmp_path, synthetic_dir, 3, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed == [(3, 3)]


def test_bar_total_counts_batches_when_a_batch_makes_several_steps(synthetic_dir):
    """Two optimiser steps per rollout: 4 steps are 2 batches (Lightning's bar ended at 2/4)."""
    module = build(loop={"mini_batches": 2})
    totals = _Totals()
    trainer = fit(
        module, synthetic_dir, [rollout_callback(), RichBar(), totals], steps=4, enable_progress_bar=True
    )
    assert trainer.global_step == 4 and totals.seen == [(1, 2), (2, 2)]


def test_progress_line_shows_the_rollout_reward(synthetic_dir, capsys):
    module = build(loop={"mini_batches": 2})
    fit(
        module,
        synthetic_dir,
        [rollout_callback(), ProgressLine(every_n_steps=1)],
        steps=4,
        enable_progress_bar=True,
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]  # one line per batch: 2 steps each
    for line in lines:
        fields = dict(re.findall(r"(loss|lr|reward|eta) (\S+)", line))
        assert set(fields) == {"loss", "lr", "reward", "eta"}, line
        assert torch.isfinite(torch.tensor([float(fields["reward"]), float(fields["loss"])])).all()
        assert int(re.search(r"([\d,]+) tok/s", line).group(1).replace(",", "")) > 0


@pytest.mark.parametrize(
    "max_epochs, description", [(-1, "Epoch 0"), (3, "Epoch 0/2")]
)  # -1: max_steps ends it
def test_rich_bar_description(max_epochs, description):
    bar = RichBar()
    bar.setup(L.Trainer(max_epochs=max_epochs, max_steps=5, logger=False, callbacks=[bar]), None, "fit")
    assert bar._get_train_description(0).strip() == description
