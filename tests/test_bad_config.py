"""A corpus of bad checkpoints and settings, each given to the `lightning-vlm` entry point (``main``): each
ends the command with one line, ``error: ...``, that names the culprit (the path or the key), before any
weights load, and never advises loading a checkpoint unsafely."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import torch
import yaml

from lightning_vlm.cli import main
from lightning_vlm.model.backbone import VLMBackbone

ROOT = Path(__file__).resolve().parents[1]


def _bytes(content: bytes):
    def make(tmp: Path, checkpoints: dict) -> Path:
        (tmp / "bad.ckpt").write_bytes(content)
        return tmp / "bad.ckpt"

    return make


def _truncated(tmp: Path, checkpoints: dict) -> Path:
    data = checkpoints["sft"].read_bytes()
    (tmp / "half.ckpt").write_bytes(data[: len(data) // 2])  # a save cut short
    return tmp / "half.ckpt"


def _saved(obj):
    def make(tmp: Path, checkpoints: dict) -> Path:
        torch.save(obj, tmp / "saved.ckpt")
        return tmp / "saved.ckpt"

    return make


def _empty_folder(tmp: Path, checkpoints: dict) -> Path:
    (tmp / "folder.ckpt").mkdir()
    return tmp / "folder.ckpt"


CHECKPOINTS = {
    # name: (make the --ckpt_path, what the message says after the path)
    "another-objective": (lambda tmp, c: c["dpo"], "was saved by the DPO objective"),
    "empty-file": (_bytes(b""), ": the file is empty"),
    "text-file": (_bytes(b"epoch: 3\nstep: 20\n"), ": not a PyTorch checkpoint"),
    "random-bytes": (_bytes(bytes(range(256)) * 64), ": not a PyTorch checkpoint"),
    "truncated": (_truncated, ": not a PyTorch checkpoint (truncated"),
    "bare-state-dict": (_saved({"w": torch.zeros(2)}), ": not a Lightning checkpoint"),
    "python-object": (
        _saved({"pytorch-lightning_version": "2.6.6", "hyper_parameters": argparse.Namespace(lr=1)}),
        ": it holds a Python object (argparse.Namespace)",
    ),  # fmt: skip
    "folder-without-meta": (_empty_folder, ": a folder without meta.pt"),
    "missing": (lambda tmp, c: tmp / "nowhere.ckpt", ": no such file or folder"),
}


def _run(args: list[str], capfd) -> str:
    """The command's one line of output, after checking it ended with status 2 and printed nothing else."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    out = capfd.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def no_weights(monkeypatch):
    """Bad input must be caught before any weights load."""

    def refuse(self):
        raise AssertionError("weights loaded before the bad input was reported")

    monkeypatch.setattr(VLMBackbone, "load", refuse)


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_bad_checkpoint_is_named(case, objective_checkpoints, tmp_path, capfd, no_weights):
    make, says = CHECKPOINTS[case]
    path = make(tmp_path, objective_checkpoints)
    line = _run(["fit", "--config", str(ROOT / "zoo" / "tiny_qwen2vl_sft.yaml"), "--trainer.logger", "false",
                 "--ckpt_path", str(path)], capfd)  # fmt: skip
    assert line.startswith(f"error: --ckpt_path {path}") and says in line
    assert "weights_only" not in line and "unsafe" not in line.lower()


def _text_only_model(tmp: Path) -> str:
    (tmp / "llama").mkdir()
    (tmp / "llama" / "config.json").write_text('{"model_type": "llama"}')
    return str(tmp / "llama")


def _no_config(tmp: Path) -> str:
    (tmp / "weights_only").mkdir()
    return str(tmp / "weights_only")


SETTINGS = {
    # name: (config override, what the message says; "{x}" stands for the override's path)
    "missing-model-folder": ({"model": {"init_args": {"backbone": {"tiny": None, "model_name_or_path": "/no/model"}}}},
                             "backbone.model_name_or_path: no model folder at /no/model"),
    "text-only-model": ({"model": {"init_args": {"backbone": {"tiny": None, "model_name_or_path": _text_only_model}}}},
                        "{x}: model_type 'llama' is not a vision-language model"),
    "folder-without-config": ({"model": {"init_args": {"backbone": {"tiny": None, "model_name_or_path": _no_config}}}},
                              "{x}: not a model folder (no config.json)"),
    "negative-lr": ({"model": {"init_args": {"lr": -1.0e-5}}}, "model.init_args.lr must be > 0, got -1e-05"),
    "negative-warmup": ({"model": {"init_args": {"warmup_steps": -1}}}, "model.init_args.warmup_steps must be >= 0"),
    "zero-batch-size": ({"data": {"init_args": {"batch_size": 0}}}, "data.init_args.batch_size must be >= 1, got 0"),
    "zero-eval-batch-size": ({"data": {"init_args": {"eval_batch_size": 0}}}, "data.init_args.eval_batch_size must be"),
    "negative-workers": ({"data": {"init_args": {"num_workers": -2}}}, "data.init_args.num_workers must be >= 0"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_bad_setting_is_named_before_the_model_loads(case, tmp_path, capfd, no_weights):
    override, says = copy.deepcopy(SETTINGS[case])
    backbone = override.get("model", {}).get("init_args", {}).get("backbone", {})
    made = None
    if callable(backbone.get("model_name_or_path")):
        made = backbone["model_name_or_path"] = backbone["model_name_or_path"](tmp_path)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(override))
    line = _run(["fit", "--config", str(ROOT / "zoo" / "tiny_qwen2vl_sft.yaml"), "--config", str(tmp_path / "bad.yaml"),
                 "--trainer.logger", "false"], capfd)  # fmt: skip
    assert line.startswith("error: ") and says.replace("{x}", str(made)) in line, line
