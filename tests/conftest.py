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
    from lightning_vlm.objectives import RewardModel
    from lightning_vlm.processing import save_processor

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
