"""GRPO, GSPO and PPO from the command line through the vLLM engine, and a resumed run's samples.

Marked ``vllm`` (see tests/rollout/test_vllm_engine.py). Every run builds its own engine, as a user's
process does.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_vlm.cli import VLMCLI

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
ENGINE = {"class_path": "lightning_vlm.rollout.VLLMEngine",
          "init_args": {"dtype": "float32", "max_model_len": 512, "enforce_eager": True}}  # fmt: skip


def _run(recipe: str, tmp_path: Path, synthetic_dir: Path, model: dict, rollout: dict, steps: int) -> VLMCLI:
    override = {
        "trainer": {"max_steps": steps, "val_check_interval": 1, "limit_val_batches": 1, "log_every_n_steps": 1,
                    "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "csv"}},
                    "callbacks": [{"class_path": "lightning_vlm.rollout.RolloutCallback",
                                   "init_args": {"num_generations": 4, "max_new_tokens": 4, "table_every_n_steps": 0,
                                                 "engine": ENGINE, **rollout}}]},
        "model": model,
        "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "prompt_train.jsonl"),
                               "val": str(synthetic_dir / "prompt_val.jsonl"), "batch_size": 2,
                               "eval_batch_size": 2, "num_workers": 0}},
        "report_held_out": False,
    }  # fmt: skip
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(override))
    return VLMCLI(args=["fit", "--config", str(ROOT / "zoo" / recipe), "--config", str(path)])


TINY = {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}}}


@pytest.mark.parametrize(
    "objective, recipe, extra",
    [
        ("GSPO", "tiny_qwen2vl_gspo_vllm.yaml", {"loop": {"mini_batches": 2}}),
        ("GRPO", "tiny_qwen2vl_gspo_vllm.yaml", {"beta": 0.05}),
        ("PPO", "tiny_qwen2vl_ppo.yaml", {"loop": {"num_iterations": 1, "mini_batches": 2}}),
    ],
)
def test_online_objectives_train_through_the_vllm_engine(
    objective, recipe, extra, tmp_path, synthetic_dir, rm_folder
):
    from lightning_vlm.rollout import RolloutCallback, VLLMEngine

    init = {**TINY, **extra}
    rollout: dict = {
        "rewards": ["lightning_vlm.rollout.rewards.accuracy", "tests.helpers.online.token_reward"]
    }
    if objective == "PPO":
        init["critic"] = {"model_name_or_path": str(rm_folder)}
        rollout = {"rewards": [{"class_path": "lightning_vlm.objectives.RewardModelReward",
                                "init_args": {"path": str(rm_folder)}}]}  # fmt: skip
    model = {"class_path": f"lightning_vlm.objectives.{objective}", "init_args": init}

    cli = _run(recipe, tmp_path, synthetic_dir, model, rollout, steps=4)
    assert cli.trainer.global_step == 4
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RolloutCallback)]
    assert isinstance(callback.engine, VLLMEngine) and callback.engine.llm is not None
    start = type(cli.model)(**{k: v for k, v in cli.model.hparams.items() if k in ("backbone",)}, **(
        {"critic": cli.model.hparams["critic"]} if objective == "PPO" else {}))  # fmt: skip
    start.configure_model()
    before = dict(start.backbone.model.named_parameters())
    trained = {n: p for n, p in cli.model.backbone.model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in cli.model.backbone.model.named_parameters() if not p.requires_grad}
    assert trained and frozen  # the vision tower is frozen in these recipes
    assert any(not torch.equal(p, before[n]) for n, p in trained.items())
    assert all(torch.equal(p, before[n]) for n, p in frozen.items())
    (csv,) = tmp_path.glob("csv/**/metrics.csv")
    rows = [dict(zip(csv.read_text().splitlines()[0].split(","), line.split(","), strict=True))
            for line in csv.read_text().splitlines()[1:]]  # fmt: skip
    gaps = [float(r["rollout/logp_gap"]) for r in rows if r.get("rollout/logp_gap")]
    syncs = [float(r["rollout/weight_sync_s"]) for r in rows if r.get("rollout/weight_sync_s")]
    assert gaps and all(math.isfinite(g) and g < 0.05 for g in gaps), gaps  # same fp32 weights: a small gap
    assert len(syncs) == 4 // cli.model.steps_per_batch and all(s > 0 for s in syncs)  # once per rollout


def _fit(tmp: Path, synthetic_dir: Path, max_steps: int, ckpt_path=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_vlm import BackboneConfig, TinyVLM
    from lightning_vlm.data import PromptDataModule
    from lightning_vlm.objectives import GRPO
    from lightning_vlm.objectives.online import OnlineSettings
    from lightning_vlm.rollout import RolloutCallback, VLLMEngine
    from tests.helpers.online import Spy, token_reward

    L.seed_everything(0)
    model = GRPO(BackboneConfig(tiny=TinyVLM()), lr=1e-3, loop=OnlineSettings(mini_batches=2))
    record = Spy()
    engine = VLLMEngine(**ENGINE["init_args"])
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp,
        callbacks=[RolloutCallback(num_generations=4, max_new_tokens=4, rewards=[token_reward],
                                   table_every_n_steps=0, engine=engine),
                   record, ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, every_n_train_steps=2)],
    )  # fmt: skip
    trainer.fit(model, PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"), batch_size=2),
                ckpt_path=ckpt_path)  # fmt: skip
    return [r.completion_ids for (r,) in record.rollouts]


def test_an_interrupted_run_resumes_with_the_same_samples(tmp_path, synthetic_dir):
    full = _fit(tmp_path / "full", synthetic_dir, max_steps=6)  # 3 rollouts x 2 optimiser steps
    first = _fit(tmp_path / "cut", synthetic_dir, max_steps=2)
    resumed = _fit(
        tmp_path / "cut", synthetic_dir, max_steps=6, ckpt_path=tmp_path / "cut" / "ckpt" / "last.ckpt"
    )
    assert len(full) == 3 and len(first) == 1 and len(resumed) == 2
    for k, (got, want) in enumerate(zip(first + resumed, full, strict=True)):
        assert torch.equal(got, want), f"rollout {k}"
    assert not torch.equal(full[0], full[2])  # the samples follow the updated weights and the rollout seed


@pytest.mark.parametrize("strategy", ["ddp_cpu", "fsdp_cpu"])
def test_two_processes_give_each_rank_its_own_engine(strategy, tmp_path, synthetic_dir):
    """`lightning-vlm fit` with configs/ddp_cpu.yaml or fsdp_cpu.yaml: two processes, each with its vLLM
    engine, sampling its own prompts; the ranks' weights stay equal and train, and after the first update
    (synced: whole tensors gathered from the FSDP2 shards) each engine samples from the trainer's weights."""
    import subprocess
    import sys

    override = {
        "report_held_out": False,
        "trainer": {"max_steps": 2, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path), "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "lightning_vlm.rollout.RolloutCallback",
                                   "init_args": {"num_generations": 4, "max_new_tokens": 4, "table_every_n_steps": 0,
                                                 "rewards": ["tests.helpers.online.token_reward"], "engine": ENGINE}},
                                  {"class_path": "tests.helpers.rank_weights.SaveRankWeights",
                                   "init_args": {"folder": str(tmp_path / "weights")}}]},
        "model": {"init_args": {**TINY, "lr": 0.02, "warmup_steps": 0}},  # a large first step: a stale engine shows
        "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "prompt_train.jsonl"), "val": None,
                               "batch_size": 2, "num_workers": 0}},
    }  # fmt: skip
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(override))
    cli = Path(sys.executable).parent / "lightning-vlm"
    done = subprocess.run([str(cli), "fit", "--config", str(ROOT / "zoo" / "tiny_qwen2vl_gspo_vllm.yaml"),
                           "--config", str(ROOT / "configs" / f"{strategy}.yaml"), "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("init engine") + done.stderr.count("init engine") == 2  # one engine per rank
    ranks = [torch.load(tmp_path / "weights" / f"rank{r}.pt") for r in (0, 1)]
    from lightning_vlm import BackboneConfig, TinyVLM
    from lightning_vlm.objectives import GSPO

    start = GSPO(BackboneConfig(tiny=TinyVLM()))
    start.configure_model()
    initial = dict(start.named_parameters())
    gaps = [float(r.pop("rollout/logp_gap")) for r in ranks]
    assert all(g < 0.05 for g in gaps), gaps  # after a sync; an engine left stale gave 0.26-0.29 here
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0])
    assert any(not torch.equal(ranks[0][n], initial[n]) for n in ranks[0])
