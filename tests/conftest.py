"""Shared fixtures: an isolated model cache, offline W&B, and small synthetic data built once."""

from __future__ import annotations

import os

import pytest

from lightning_vlm.data.synthetic import write_synthetic


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = {k: os.environ.get(k) for k in ("LIGHTNING_VLM_CACHE", "WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")}
    os.environ["LIGHTNING_VLM_CACHE"] = str(cache)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_DIR"] = str(tmp_path_factory.mktemp("wandb"))
    os.environ["WANDB_SILENT"] = "true"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine the thread pool's
    contention made the online-RL tests about 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small synthetic dataset (all splits), written once per test session."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic(out, n_train=48, n_val=16, image_size=112, seed=0)
    return out


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """Each test's W&B run ends with it; otherwise the next WandbLogger attaches to the open run."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@pytest.fixture(scope="session")
def rm_folder(tmp_path_factory):
    """A reward model export of the tiny Qwen2-VL, as ExportHF writes it (a random, non-zero head)."""
    import torch

    from lightning_vlm import BackboneConfig, TinyVLM
    from lightning_vlm.model.processing import save_processor
    from lightning_vlm.objectives import RewardModel

    torch.manual_seed(1)
    rm = RewardModel(BackboneConfig(tiny=TinyVLM(family="qwen2_vl")))
    rm.configure_model()
    with torch.no_grad():
        rm.head.weight.normal_(std=0.5)
        rm.head.bias.fill_(0.3)
    folder = tmp_path_factory.mktemp("rm") / "hf"
    rm.backbone.model.save_pretrained(folder)
    save_processor(rm.backbone.processor, folder)
    rm.save_extra(folder)
    return folder


@pytest.fixture(scope="session")
def grpo_run(synthetic_dir, tmp_path_factory):
    """One GRPO step (frozen tower, beta 0, one optimiser step per rollout, G=4, B=2) with every sample
    tabled and every vision-tower and language-model call counted. Shared by the counting, table and
    validation tests (tests/objectives/online, tests/rollout); the validation test validates the module
    afterwards."""
    from tests.helpers.online import (
        B,
        Batches,
        G,
        Spy,
        build,
        count_calls,
        even_prompts,
        fit,
        rollout_callback,
        token_reward,
    )

    module = build(lr=1e-3)
    calls = count_calls(module)
    spy, batches = Spy(), Batches()
    root = tmp_path_factory.mktemp("grpo_run")
    callback = rollout_callback(rewards=(token_reward, even_prompts), table_every_n_steps=1, table_rows=B * G)
    fit(module, synthetic_dir, [callback, batches, spy], default_root_dir=str(root))
    return {"module": module, "calls": {k: list(v) for k, v in calls.items()}, "spy": spy, "batches": batches,
            "root": root, "callback": callback}  # fmt: skip


@pytest.fixture(scope="session")
def objective_checkpoints(synthetic_dir, tmp_path_factory):
    """One-step checkpoints of the tiny SFT and DPO recipes, written by the command: ``{"sft": path, "dpo": path}``."""
    from pathlib import Path

    import yaml

    from lightning_vlm.cli import VLMCLI

    root, zoo = tmp_path_factory.mktemp("objective_checkpoints"), Path(__file__).resolve().parents[1] / "zoo"
    out = {}
    for name, data in (("sft", "sft"), ("dpo", "pref")):
        override = {
            "report_held_out": False,
            "trainer": {"max_steps": 1, "logger": False, "enable_progress_bar": False, "limit_val_batches": 0,
                        "default_root_dir": str(root / name),
                        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"dirpath": str(root / name), "filename": name,
                                                     "every_n_train_steps": 1}}]},
            "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}}}},
            "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / f"{data}_train.jsonl"), "val": None,
                                   "num_workers": 0, "batch_size": 4}},
        }  # fmt: skip
        (root / f"{name}.yaml").write_text(yaml.safe_dump(override))
        VLMCLI(
            args=[
                "fit",
                "--config",
                str(zoo / f"tiny_qwen2vl_{name}.yaml"),
                "--config",
                str(root / f"{name}.yaml"),
            ]
        )
        out[name] = root / name / f"{name}.ckpt"
    return out
