"""docs/architecture.md's RLOO walk-through: its code block, as written there, trains from the CLI."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
import yaml

from lightning_vlm.cli import VLMCLI
from lightning_vlm.objectives.online import OnlineObjective
from lightning_vlm.rollout import RolloutCallback

ROOT = Path(__file__).resolve().parents[2]


def _block(marker: str) -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    match = re.search(rf"<!-- walkthrough: {re.escape(marker)} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"docs/architecture.md has no walk-through block {marker}"
    return match.group(1)


def _length(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]


def test_the_rloo_walkthrough_trains_from_the_cli(tmp_path, synthetic_dir, monkeypatch):
    (tmp_path / "my_rloo.py").write_text(_block("my_rloo.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    override = {
        "trainer": {"max_steps": 2, "logger": False, "default_root_dir": str(tmp_path),
                    "enable_progress_bar": False, "limit_val_batches": 0,
                    "callbacks": [{"class_path": "lightning_vlm.rollout.RolloutCallback",
                                   "init_args": {"num_generations": 4, "max_new_tokens": 4}}]},
        "model": {"class_path": "my_rloo.MyRLOO",
                  "init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}},
                                "eps": 0.1, "loop": {"mini_batches": 2}}},
        "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "prompt_train.jsonl"),
                               "val": str(synthetic_dir / "prompt_val.jsonl"), "batch_size": 2,
                               "eval_batch_size": 2, "num_workers": 0}},
    }  # fmt: skip
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    cli = VLMCLI(
        args=["--config", str(ROOT / "zoo" / "tiny_qwen2vl_gspo.yaml"), "--config", str(path)], run=False
    )
    module = cli.model
    assert type(module).__name__ == "MyRLOO" and isinstance(module, OnlineObjective)
    assert module.hparams.eps == 0.1 and module.settings.mini_batches == 2
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RolloutCallback)]
    callback.rewards = [_length]  # an untrained model answers nothing right: reward what varies
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters() if n in before)
    sys.modules.pop("my_rloo", None)
