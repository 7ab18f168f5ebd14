"""Data parallel on 2 CPU processes (gloo), launched as the user would: the `lightning-vlm` command in a
subprocess (DESIGN: plain ddp re-runs the launching command in rank 1, so never pytest itself).

SFT, DPO and MPO under DDP reach the weights of one process with the same global batch; the online
objectives run under DDP (a rank-0-only collective used to hang them at the first sample table)."""

from __future__ import annotations

import json
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


RECIPES = {"sft": "tiny_qwen2vl_sft.yaml", "sft-lora": "tiny_qwen2vl_sft.yaml", "pref": "tiny_qwen2vl_dpo.yaml",
           "pref-mpo": "tiny_qwen2vl_mpo.yaml", "prompt": "tiny_qwen2vl_gspo.yaml", "prompt-tied": "tiny_qwen2vl_gspo.yaml"}  # fmt: skip
TIED = {"family": "qwen2_vl", "tie_word_embeddings": True}  # an LM head shared with the embeddings


def _fit(tmp: Path, recipe: str, data: str, config: str, batch_size: int, extra: dict | None = None) -> Path:
    """Run `lightning-vlm fit` on a recipe, stacked with ``configs/<config>.yaml``, with the tiny
    in-process model; returns its HF export."""
    out = tmp / config
    train = data / f"{recipe.split('-')[0]}_train.jsonl"
    if recipe == "pref-mpo":  # chosen answers of varied length, so the ranks' token counts differ
        train = data / "pref_varied_train.jsonl"
        rows = [json.loads(line) for line in (data / "pref_train.jsonl").read_text().splitlines()[:16]]
        for i, row in enumerate(rows):
            row["chosen"][0]["content"][0]["text"] += " ok" * (3 * (i % 4))
        train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    override = {
        "report_held_out": False,
        "trainer": {"max_steps": 3, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(out), "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "lightning_vlm.export.ExportHF",
                                   "init_args": {"dirpath": str(out / "hf")}}]},
        "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}}}},
        "data": {"init_args": {"synthetic": None, "train": str(train), "val": None,
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
    cmd = [str(CLI), "fit", "--config", str(ROOT / "zoo" / RECIPES[recipe]), "--config", str(ROOT / "configs" / f"{config}.yaml"),
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
    "model": {"class_path": "lightning_vlm.objectives.GRPO", "beta": 0.04, "norm": "dapo", "loop": {"mini_batches": 2},
              "scale_rewards": "batch"},
    "trainer": {"max_steps": 4, "callbacks": [
        {"class_path": "lightning_vlm.rollout.RolloutCallback",
         "init_args": {"num_generations": 4, "max_new_tokens": 4, "table_every_n_steps": 0, "per_prompt_seeds": True,
                       "rewards": ["varied_reward.token_reward"]}},
    ]},
}  # fmt: skip


LORA = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "vision": "frozen", "gradient_checkpointing": True}


def _extra(recipe: str) -> dict:
    extra = {"model": {"lr": 3e-4, "warmup_steps": 0}}
    if recipe == "sft-lora":  # adapters under FSDP2, with activation checkpointing
        extra["model"]["backbone"] = {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}, **LORA}
    if recipe.startswith("prompt"):
        extra = {"model": {**extra["model"], **GRPO["model"]}, "trainer": GRPO["trainer"]}
    if recipe == "prompt-tied":  # generation and log-probs through a tied head (Qwen2-VL-2B's layout)
        extra["model"]["backbone"] = {"model_name_or_path": None, "tiny": TIED}
    return extra


@pytest.fixture(scope="module")
def single(tmp_path_factory, synthetic_dir):
    """Each recipe's weights from one process with the global batch (4 rows), computed once."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def weights(recipe: str) -> dict[str, torch.Tensor]:
        if recipe not in cache:
            tmp = tmp_path_factory.mktemp(f"single-{recipe}")
            cache[recipe] = _weights(_fit(tmp, recipe, synthetic_dir, "cpu", 4, _extra(recipe)))
        return cache[recipe]

    return weights


@pytest.mark.parametrize(
    "recipe, config",
    [(r, c) for r in ("sft", "pref", "prompt") for c in ("ddp_cpu", "fsdp_cpu")]
    + [("sft-lora", "fsdp_cpu"), ("prompt-tied", "fsdp_cpu"), ("pref-mpo", "ddp_cpu")],
    ids=lambda v: {"pref": "dpo", "pref-mpo": "mpo", "prompt": "grpo", "ddp_cpu": "ddp", "fsdp_cpu": "fsdp2"}.get(v, v),
)
def test_two_processes_reach_the_single_process_weights(recipe, config, single, tmp_path, synthetic_dir):
    """2 ranks x 2 rows against 1 process x 4 rows: the same rows per step (the sampler interleaves
    the same seeded order), so the same update, whether each rank holds the whole model (DDP) or a
    shard (FSDP2). SFT, and MPO's generation term, normalise by the token count of all ranks. GRPO
    (2 rollouts of 2 optimiser steps, k3 KL, token-level normalisation over both ranks, advantages
    scaled by the std of both ranks' rewards) samples with per-prompt seeds, so both runs draw the
    same completions."""
    distributed = _weights(_fit(tmp_path, recipe, synthetic_dir, config, 2, _extra(recipe)))
    reference = single(recipe)
    from lightning_vlm.model.tiny import TinyVLM, ensure_tiny_vlm

    start = _weights(
        ensure_tiny_vlm(TinyVLM(**(TIED if recipe == "prompt-tied" else {"family": "qwen2_vl"})))
    )
    assert distributed.keys() == reference.keys()
    moved = max(float((reference[k] - start[k]).abs().max()) for k in reference)
    diff = max(float((distributed[k] - reference[k]).abs().max()) for k in distributed)
    assert moved > 20 * TOLERANCE, moved  # the steps changed the weights, so agreeing is not trivial
    print(f"{recipe} {config}: moved {moved:.2e}, against one process {diff:.2e}")
    assert diff < TOLERANCE, f"max weight difference {diff:.2e}"


@pytest.mark.parametrize("config", ["ddp_cpu", "fsdp_cpu"], ids=["ddp", "fsdp2"])
def test_online_objectives_run_on_two_processes_and_write_sample_tables(
    config, tmp_path, synthetic_dir, rm_folder
):
    """GSPO and PPO (with its critic) on 2 CPU processes from the CLI, a sample table every rollout;
    PPO's held-out check also samples (its recipe's eval_sampling) and scores the KL to the reference."""
    for recipe, model in [
        ("tiny_qwen2vl_gspo.yaml", {}),
        ("tiny_qwen2vl_ppo.yaml", {"critic": {"model_name_or_path": str(rm_folder)}}),
    ]:
        rollout = {"class_path": "lightning_vlm.rollout.RolloutCallback",
                   "init_args": {"num_generations": 2, "max_new_tokens": 4, "table_every_n_steps": 1,
                                 "eval_sampling": "ppo" in recipe}}  # fmt: skip
        out = tmp_path / recipe.removesuffix(".yaml")
        override = {
            "report_held_out": False,
            "trainer": {"max_steps": 4, "limit_val_batches": 1, "val_check_interval": 1, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False, "default_root_dir": str(out),
                        "callbacks": [rollout]},
            "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}},
                                    "loop": {"mini_batches": 2}, **model}},
            "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "prompt_train.jsonl"),
                                   "val": str(synthetic_dir / "prompt_val.jsonl"), "batch_size": 2,
                                   "eval_batch_size": 2, "num_workers": 0}},
        }  # fmt: skip
        if "ppo" in recipe:
            override["model"]["init_args"]["loop"]["num_iterations"] = 1
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(override))
        cmd = [str(CLI), "fit", "--config", str(ROOT / "zoo" / recipe), "--config",
               str(ROOT / "configs" / f"{config}.yaml"), "--config", str(path)]  # fmt: skip
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = (out / "samples.jsonl").read_text().splitlines()
        assert len(rows) == 2 * 4  # rank 0's table (2 prompts x 2 samples) for each of the 2 rollouts


def test_fsdp2_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path, synthetic_dir):
    """A distributed (sharded) checkpoint at step 2, resumed to step 4, ends where 4 steps in a row end."""

    def run(name: str, *extra: str) -> subprocess.CompletedProcess:
        override = {
            "report_held_out": False,
            "trainer": {"max_steps": 4, "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
                        "default_root_dir": str(tmp_path / name),
                        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"dirpath": str(tmp_path / name / "ckpt"),
                                                     "every_n_train_steps": 2, "save_top_k": -1}},
                                      {"class_path": "lightning_vlm.export.ExportHF",
                                       "init_args": {"dirpath": str(tmp_path / name / "hf")}}]},
            "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}},
                                    "lr": 3e-4, "warmup_steps": 0}},
            "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "sft_train.jsonl"), "val": None,
                                   "batch_size": 2, "num_workers": 0}},
        }  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(override))
        cmd = [str(CLI), "fit", "--config", str(ROOT / "zoo" / RECIPES["sft"]), "--config",
               str(ROOT / "configs" / "fsdp_cpu.yaml"), "--config", str(path), *extra]  # fmt: skip
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run("straight")
    step2 = tmp_path / "straight" / "ckpt" / "epoch=0-step=2.ckpt"
    assert (step2 / "meta.pt").is_file() and len(list(step2.glob("*.distcp"))) == 2  # one shard per rank
    resumed = run("resumed", "--ckpt_path", str(step2))
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    assert not (tmp_path / "resumed" / "ckpt" / "epoch=0-step=2.ckpt").exists()  # it started at step 2
    a, b = _weights(tmp_path / "straight" / "hf"), _weights(tmp_path / "resumed" / "hf")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


PROBE = """
import os
import transformers

_load = transformers.AutoModelForImageTextToText.from_pretrained.__func__


def _spy(cls, *args, **kwargs):
    print(f"PROBE from_pretrained on rank {os.environ.get('LOCAL_RANK', '0')}", flush=True)
    return _load(cls, *args, **kwargs)


transformers.AutoModelForImageTextToText.from_pretrained = classmethod(_spy)
"""


def test_fsdp2_reads_the_checkpoint_on_rank_0_only(tmp_path, synthetic_dir):
    """Ranks > 0 build the model on the meta device and receive their shards from rank 0, so only one
    process per job holds a full copy (the weights' equality is the tests above)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)  # imported at start-up by both ranks
    override = {
        "report_held_out": False,
        "trainer": {"max_steps": 1, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path), "callbacks": []},
        "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}}}},
        "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "sft_train.jsonl"), "val": None,
                               "batch_size": 2, "num_workers": 0}},
    }  # fmt: skip
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    cmd = [str(CLI), "fit", "--config", str(ROOT / "zoo" / RECIPES["sft"]), "--config",
           str(ROOT / "configs" / "fsdp_cpu.yaml"), "--config", str(path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(probe), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    loads = [line for line in done.stdout.splitlines() if line.startswith("PROBE")]
    assert loads == ["PROBE from_pretrained on rank 0"], loads


def test_sft_recipe_with_its_logger_and_held_out_report_finishes_on_two_processes(tmp_path, synthetic_dir):
    """The run that once hung after fit (rank 0 in a metric barrier, rank 1 waiting on a DataLoader worker
    forked from a threaded process): the SFT recipe as shipped, W&B logger (offline), a DataLoader
    worker, the held-out report after fit, on 2 processes. Workers now start with spawn; a stuck one
    would raise (data.worker_timeout) rather than hang, and the subprocess timeout catches a hang."""
    out = tmp_path / "run"
    override = {
        "trainer": {"max_steps": 2, "default_root_dir": str(out), "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                               "init_args": {"project": "lightning-vlm", "save_dir": str(out), "offline": True}},
                    "callbacks": [{"class_path": "lightning_vlm.export.ExportHF",
                                   "init_args": {"dirpath": str(out / "hf")}}]},
        "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}},
                                "eval_max_new_tokens": 2}},
        "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "sft_train.jsonl"),
                               "val": str(synthetic_dir / "sft_val.jsonl"), "batch_size": 2,
                               "eval_batch_size": 8, "num_workers": 1, "worker_timeout": 120}},
    }  # fmt: skip
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    cmd = [str(CLI), "fit", "--config", str(ROOT / "zoo" / "tiny_qwen2vl_sft.yaml"), "--config",
           str(ROOT / "configs" / "ddp_cpu.yaml"), "--config", str(path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val/accuracy" in done.stdout and (out / "hf" / "config.json").is_file()


ROWS_LOG = """
import json
import lightning as L

class RowsLog(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with open(f"rows-{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"rows": batch["rows"], "tokens": int(batch["attention_mask"].sum())}) + "\\n")
"""


def test_packed_sft_gives_each_rank_its_own_micro_batches(tmp_path, synthetic_dir):
    """data.packing under DDP: Lightning keeps the token-budget sampler (no re-sharding), each step's two
    micro-batches hold different rows and stay within the budget, and the ranks step together."""
    (tmp_path / "rows_log.py").write_text(ROWS_LOG)
    override = {
        "report_held_out": False,
        "trainer": {"max_steps": 3, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run"),
                    "num_sanity_val_steps": 0, "callbacks": [{"class_path": "rows_log.RowsLog"}]},
        "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}}}},
        "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "sft_train.jsonl"), "val": None,
                               "packing": True, "max_tokens": 256, "max_length": 256, "num_workers": 0}},
    }  # fmt: skip
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    cmd = [str(CLI), "fit", "--config", str(ROOT / "zoo" / "tiny_qwen2vl_sft.yaml"), "--config",
           str(ROOT / "configs" / "ddp_cpu.yaml"), "--config", str(path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [[json.loads(line) for line in (tmp_path / f"rows-{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    for a, b in zip(*ranks, strict=True):
        assert not set(a["rows"]) & set(b["rows"]) and max(a["tokens"], b["tokens"]) <= 256
    used = [r for rank in ranks for step in rank for r in step["rows"]]
    assert len(used) == len(set(used)) > 6  # no row twice in the epoch's first steps, several per micro-batch
