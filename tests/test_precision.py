"""bf16-mixed and bf16-true train SFT, DPO and GRPO on the CPU, with the weights in the dtype each asks for."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lightning_vlm.cli import VLMCLI
from lightning_vlm.rollout import RolloutCallback

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "sft": "tiny_qwen2vl_sft.yaml",
    "pref": "tiny_qwen2vl_dpo.yaml",
    "prompt": "tiny_qwen2vl_gspo.yaml",
}


def varied(prompts, completions, completion_ids, **row):
    return [float(sum((i + 1) * t for i, t in enumerate(ids)) % 13) / 13 for ids in completion_ids]


class Probe(L.Callback):
    """Records the weights' dtype and the trainable weights at the start."""

    def __init__(self):
        self.dtypes: dict[str, torch.dtype] = {}

    def on_train_start(self, trainer, module):
        self.before = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}
        self.dtypes["weights"] = next(module.backbone.model.parameters()).dtype


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("recipe", ["sft", "pref", "prompt"], ids=["sft", "dpo", "grpo"])
def test_bf16_trains(recipe, precision, tmp_path, synthetic_dir):
    override = {
        "report_held_out": False,
        "trainer": {"max_steps": 2, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path), "precision": precision,
                    "callbacks": []},
        "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}},
                                "lr": 1e-3, "warmup_steps": 0}},
        "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / f"{recipe}_train.jsonl"), "val": None,
                               "batch_size": 2, "num_workers": 0}},
    }  # fmt: skip
    if recipe == "prompt":
        override["model"]["class_path"] = "lightning_vlm.objectives.GRPO"
        override["model"]["init_args"].update(beta=0.04, loop={"num_iterations": 2, "mini_batches": 1})
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    cli = VLMCLI(args=["--config", str(ROOT / "zoo" / RECIPES[recipe]), "--config", str(path)], run=False)
    probe = Probe()
    cli.trainer.callbacks.append(probe)
    if recipe == "prompt":
        cli.trainer.callbacks.insert(
            0, RolloutCallback(num_generations=2, max_new_tokens=4, rewards=[varied], table_every_n_steps=0)
        )
    cli.trainer.fit(cli.model, cli.datamodule)
    assert probe.dtypes["weights"] == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    loss = float(cli.trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss)
    after = {n: p.detach().float() for n, p in cli.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(after[n], probe.before[n]) for n in after)  # bf16 steps still move weights


def test_logps_take_the_log_softmax_in_float32_over_bf16_logits():
    """Every log-prob goes through ``_chunk_logps``: with bf16 weights and hidden states, the log-softmax
    runs on the logits cast to float32, which differs measurably from a bf16 log-softmax."""
    from lightning_vlm.model.backbone import _chunk_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.mul_(8)  # spread-out logits, as a trained LM head has
    h = torch.randn(32, 64, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (32,))
    ours, _ = _chunk_logps(h, y, head, None)
    logits = head(h)
    fp32 = logits.float().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    bf16 = logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1).float()
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, fp32, atol=1e-5)
    assert (ours - bf16).abs().max() > 1e-2  # the bf16 path would lose this much
