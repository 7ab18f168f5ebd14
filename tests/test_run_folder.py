"""One setting names the run folder (``trainer.default_root_dir``): the logger, the checkpoints and the export
follow it, and a second ``fit`` into a folder that holds a run is refused unless asked to overwrite or resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import wandb
import yaml

from lightning_vlm.cli import VLMCLI, main

TINY = Path(__file__).resolve().parents[1] / "zoo" / "tiny_qwen2vl_sft.yaml"


def _args(run: Path, synthetic_dir: Path, *extra: str) -> list[str]:
    """The offline tiny recipe with no folder of its own for the logger, checkpoints or export."""
    callbacks = [
        {"class_path": "lightning_vlm.export.ExportHF"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": 2}},
    ]  # fmt: skip
    override = run.parent / f"{run.name}_callbacks.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return [
        "--config", str(TINY),
        "--config", str(override),
        "--trainer.default_root_dir", str(run),
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--report_held_out", "false",
        "--data.init_args.synthetic", "null",
        "--data.init_args.train", str(synthetic_dir / "sft_train.jsonl"),
        "--data.init_args.val", str(synthetic_dir / "sft_val.jsonl"),
        "--data.init_args.num_workers", "0",
        "--data.init_args.eval_batch_size", "16",
        *extra,
    ]  # fmt: skip


def test_the_run_folder_holds_the_run_and_a_second_fit_is_refused(
    tmp_path, synthetic_dir, monkeypatch, capfd
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = tmp_path / "run"
    VLMCLI(args=["fit", *_args(run, synthetic_dir)])
    assert list((run / "wandb").glob("offline-run-*")), "W&B wrote its run into the run folder"
    assert (run / "config.yaml").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert (run / "hf" / "config.json").is_file()
    assert not list(cwd.iterdir()), "nothing is written to the current directory"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == "."  # kept unset, as the recipe has it
    wandb.finish()  # else the next WandbLogger in this process attaches to the open run
    again = tmp_path / "again"  # so a repeat of the saved config moves with the one setting too
    VLMCLI(args=["fit", "--config", str(run / "config.yaml"), "--trainer.default_root_dir", str(again)])
    assert list((again / "wandb").glob("offline-run-*")) and (again / "config.yaml").is_file()
    assert (again / "checkpoints" / "last.ckpt").is_file() and (again / "hf" / "config.json").is_file()
    capfd.readouterr()

    with pytest.raises(SystemExit) as exit_:  # a rerun would replace the export that later stages load
        main(["fit", *_args(run, synthetic_dir)])
    assert exit_.value.code == 2
    err = capfd.readouterr().err.strip()
    assert err.splitlines() == [err] and f"{run / 'hf'} holds another run's export" in err, err
    assert "--trainer.default_root_dir" in err and "--overwrite true" in err

    exported = (run / "hf" / "config.json").stat().st_mtime_ns
    VLMCLI(args=["fit", *_args(run, synthetic_dir), "--overwrite", "true"])
    assert (run / "hf" / "config.json").stat().st_mtime_ns != exported  # written over, as asked

    resumed = VLMCLI(args=["fit", *_args(run, synthetic_dir, "--trainer.max_steps", "4"),
                           "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])  # fmt: skip
    assert resumed.trainer.global_step == 4  # resuming into its own folder is no collision
    checked = VLMCLI(args=["validate", *_args(run, synthetic_dir)])  # evaluating never refuses
    assert "val/loss" in checked.trainer.callback_metrics


def test_checkpoints_alone_mark_a_started_run(tmp_path, synthetic_dir, capfd):
    """A run stopped before its export still owns its folder; an empty checkpoints folder does not."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    args = ["fit", *_args(run, synthetic_dir, "--trainer.logger", "false"), "--trainer.max_steps", "0"]
    VLMCLI(args=args)  # not refused: nothing in the checkpoints folder
    shutil.rmtree(run / "hf")  # as if killed before the export
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capfd.readouterr().err
    assert exit_.value.code == 2 and f"{run / 'checkpoints'} holds another run's checkpoints" in err
