"""Data parallel on 2 CPU processes (gloo), launched as the user would: the `lightning-vlm` command in a
subprocess (DESIGN: plain ddp re-runs the launching command in rank 1, so never pytest itself).

SFT and DPO under DDP reach the weights of one process with the same global batch; the online
objectives run under DDP (a rank-0-only collective used to hang them at the first sample table)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "lightning-vlm"
TOLERANCE = 2e-5  # max |w_ddp - w_single| after 3 AdamW steps at lr 3e-4 (float reduction order only)


RECIPES = {"sft": "tiny_qwen2vl_sft.yaml", "pref": "tiny_qwen2vl_dpo.yaml", "prompt": "tiny_qwen2vl_gspo.yaml"}


def _fit(tmp: Path, recipe: str, data: str, ddp: bool, batch_size: int, extra: dict | None = None) -> Path:
    """Run `lightning-vlm fit` on a recipe with the tiny in-process model; returns its HF export."""
    out = tmp / ("ddp" if ddp else "single")
    override = {
        "report_held_out": False,
        "trainer": {"max_steps": 3, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(out), "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "lightning_vlm.callbacks.ExportHF",
                                   "init_args": {"dirpath": str(out / "hf")}}]},
        "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}}}},
        "data": {"init_args": {"synthetic": None, "train": str(data / f"{recipe}_train.jsonl"), "val": None,
                               "batch_size": batch_size, "num_workers": 0}},
    }  # fmt: skip
    extra = {k: dict(v) for k, v in (extra or {}).items()}
    trainer = extra.pop("trainer", {})
    override["trainer"]["callbacks"] = trainer.pop("callbacks", []) + override["trainer"]["callbacks"]
    override["trainer"].update(trainer)
    model = extra.pop("model", {})
    if "class_path" in model:
        override["model"]["class_path"] = model.pop("class_path")
    override["model"]["init_args"].update(model)
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(override))
    config = "configs/ddp_cpu.yaml" if ddp else "configs/cpu.yaml"
    cmd = [str(CLI), "fit", "--config", str(ROOT / "zoo" / RECIPES[recipe]), "--config", str(ROOT / config),
           "--config", str(path)]  # fmt: skip
    (tmp / "varied_reward.py").write_text(VARIED_REWARD)  # importable by both ranks: cwd on PYTHONPATH
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "hf"


# The untrained tiny model earns no accuracy reward; this one varies within every group.
VARIED_REWARD = """
def token_reward(prompts, completions, completion_ids, **row):
    return [float(sum((i + 1) * t for i, t in enumerate(ids)) % 13) / 13 for ids in completion_ids]
"""


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


GRPO = {
    "model": {"class_path": "lightning_vlm.objectives.GRPO", "beta": 0.04, "norm": "dapo", "mini_batches": 2},
    "trainer": {"max_steps": 4, "callbacks": [
        {"class_path": "lightning_vlm.rollout.RolloutCallback",
         "init_args": {"num_generations": 4, "max_new_tokens": 4, "table_every_n_steps": 0, "per_prompt_seeds": True,
                       "rewards": ["varied_reward.token_reward"]}},
    ]},
}  # fmt: skip


@pytest.mark.parametrize("recipe", ["sft", "pref", "prompt"], ids=["sft", "dpo", "grpo"])
def test_ddp_on_two_processes_reaches_the_single_process_weights(recipe, tmp_path, synthetic_dir):
    """2 ranks x 2 rows against 1 process x 4 rows: the same rows per step (the sampler interleaves
    the same seeded order), so the same update. SFT normalises by the token count of all ranks. GRPO
    (2 rollouts of 2 optimiser steps, k3 KL, token-level normalisation over both ranks) samples with
    per-prompt seeds, so both runs draw the same completions."""
    extra = {"model": {"lr": 3e-4, "warmup_steps": 0}}
    if recipe == "prompt":
        extra = {"model": {**extra["model"], **GRPO["model"]}, "trainer": GRPO["trainer"]}
    ddp = _weights(_fit(tmp_path, recipe, synthetic_dir, ddp=True, batch_size=2, extra=extra))
    single = _weights(_fit(tmp_path, recipe, synthetic_dir, ddp=False, batch_size=4, extra=extra))
    from lightning_vlm.tiny import TinyVLM, ensure_tiny_vlm

    start = _weights(ensure_tiny_vlm(TinyVLM(family="qwen2_vl")))
    assert ddp.keys() == single.keys()
    moved = max(float((single[k] - start[k]).abs().max()) for k in single)
    diff = max(float((ddp[k] - single[k]).abs().max()) for k in ddp)
    assert moved > 20 * TOLERANCE, moved  # the steps changed the weights, so agreeing is not trivial
    print(f"{recipe}: moved {moved:.2e}, ddp vs single {diff:.2e}")
    assert diff < TOLERANCE, f"max weight difference {diff:.2e}"


def test_online_objectives_run_under_ddp_and_write_sample_tables(tmp_path, synthetic_dir, rm_folder):
    """GSPO and PPO (with its critic) on 2 CPU processes from the CLI, a sample table every rollout."""
    rollout = {"class_path": "lightning_vlm.rollout.RolloutCallback",
               "init_args": {"num_generations": 2, "max_new_tokens": 4, "table_every_n_steps": 1}}  # fmt: skip
    for recipe, model in [
        ("tiny_qwen2vl_gspo.yaml", {}),
        ("tiny_qwen2vl_ppo.yaml", {"critic": {"model_name_or_path": str(rm_folder)}}),
    ]:
        out = tmp_path / recipe.removesuffix(".yaml")
        override = {
            "report_held_out": False,
            "trainer": {"max_steps": 4, "limit_val_batches": 1, "val_check_interval": 1, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False, "default_root_dir": str(out),
                        "callbacks": [rollout]},
            "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}},
                                    "mini_batches": 2, **model}},
            "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "prompt_train.jsonl"),
                                   "val": str(synthetic_dir / "prompt_val.jsonl"), "batch_size": 2,
                                   "eval_batch_size": 2, "num_workers": 0}},
        }  # fmt: skip
        if "ppo" in recipe:
            override["model"]["init_args"]["num_iterations"] = 1
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(override))
        cmd = [str(CLI), "fit", "--config", str(ROOT / "zoo" / recipe), "--config",
               str(ROOT / "configs" / "ddp_cpu.yaml"), "--config", str(path)]  # fmt: skip
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = (out / "samples.jsonl").read_text().splitlines()
        assert len(rows) == 2 * 4  # rank 0's table (2 prompts x 2 samples) for each of the 2 rollouts
