"""The online recipes from the command line: GSPO with rewards by import path, the real recipes against
saved tiny folders, the MoE router loss, and the tiny RLHF pipeline (SFT, reward model, PPO)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lightning_vlm.cli import VLMCLI, main
from lightning_vlm.model.tiny import TinyVLM, ensure_tiny_vlm

ROOT = Path(__file__).resolve().parents[3]

GSPO_RECIPE = ROOT / "zoo" / "tiny_qwen2vl_gspo.yaml"


def _check_group_size(module, rollout) -> None:
    """The recipe's group size fits its loop (mini_batches x accumulation), as the objective checks at
    its first rollout."""
    from types import SimpleNamespace

    module._check(SimpleNamespace(group_size=rollout.G, dynamic_sampling=rollout.dynamic_sampling))


def _gspo_override(tmp_path: Path, synthetic_dir: Path, rollout: dict) -> Path:
    """The GSPO recipe on a tiny in-process model and the test's data, one rollout, one validation batch."""
    override = {
        "trainer": {"max_steps": 2, "val_check_interval": 1, "limit_val_batches": 1, "logger": False,
                    "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "callbacks": [{"class_path": "lightning_vlm.rollout.RolloutCallback", "init_args": rollout}]},
        "model": {"init_args": {"backbone": {"model_name_or_path": None, "tiny": {"family": "qwen2_vl"}}}},
        "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "prompt_train.jsonl"),
                               "val": str(synthetic_dir / "prompt_val.jsonl"), "batch_size": 2,
                               "eval_batch_size": 2, "num_workers": 0}},
        "report_held_out": False,
    }  # fmt: skip
    path = tmp_path / "gspo_overrides.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def test_gspo_recipe_fits_with_rewards_by_import_path(tmp_path, synthetic_dir):
    from lightning_vlm.rollout import RolloutCallback
    from lightning_vlm.rollout.rewards import OverlongPenalty, accuracy

    rollout = {"num_generations": 4, "max_new_tokens": 4, "table_every_n_steps": 1,
               "rewards": ["lightning_vlm.rollout.rewards.accuracy",
                           {"class_path": "lightning_vlm.rollout.rewards.OverlongPenalty",
                            "init_args": {"max_length": 4, "cache": 2}}]}  # fmt: skip
    override = _gspo_override(tmp_path, synthetic_dir, rollout)
    cli = VLMCLI(args=["fit", "--config", str(GSPO_RECIPE), "--config", str(override)])
    assert cli.trainer.global_step == 2  # two rollouts, model.loop.mini_batches = 1 (on-policy)
    assert cli.model.settings.mini_batches == 1
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RolloutCallback)]
    assert callback.G == 4 and callback.rewards[0] is accuracy
    assert isinstance(callback.rewards[1], OverlongPenalty) and callback.rewards[1].max_length == 4
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "rollout/rewards/accuracy", "rollout/rewards/OverlongPenalty", "val/reward",
                "val/rewards/accuracy", "val/rewards/OverlongPenalty"):  # fmt: skip
        assert key in metrics and math.isfinite(float(metrics[key])), key
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert records and all({"accuracy", "OverlongPenalty", "advantage"} <= set(r) for r in records)


def test_typo_in_the_rollout_callback_fails_at_parse_time(tmp_path, synthetic_dir, capsys):
    override = _gspo_override(tmp_path, synthetic_dir, {"num_generation": 4})
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(GSPO_RECIPE), "--config", str(override), "--print_config"])
    assert exit_.value.code not in (0, None)
    assert "num_generation" in capsys.readouterr().err


@pytest.mark.parametrize(
    "recipe, family",
    [
        ("qwen2vl_gspo.yaml", "qwen2_vl"),
        ("qwen2vl_grpo.yaml", "qwen2_vl"),
        ("qwen3vl_moe_gspo.yaml", "qwen3_vl_moe"),
        ("qwen3_5_vl_gspo.yaml", "qwen3_5"),
    ],
)
def test_real_online_recipes_instantiate_against_a_saved_tiny_folder(recipe, family, tmp_path, synthetic_dir):
    from lightning_vlm.model.moe import moe_layout
    from lightning_vlm.rollout import RolloutCallback, VLLMEngine
    from lightning_vlm.rollout.rewards import OverlongPenalty, accuracy, think_format

    folder = ensure_tiny_vlm(TinyVLM(family=family))
    cli = VLMCLI(
        args=[
            "--config", str(ROOT / "zoo" / recipe),
            "--model.init_args.backbone.model_name_or_path", str(folder),
            "--trainer.accelerator", "cpu",
            "--trainer.devices", "1",
            "--trainer.strategy", "auto",
            "--trainer.precision", "32-true",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--data.init_args.train", str(synthetic_dir / "prompt_train.jsonl"),
            "--data.init_args.columns", "{}",
        ],
        run=False,
    )  # fmt: skip
    (rollout,) = [c for c in cli.trainer.callbacks if isinstance(c, RolloutCallback)]
    assert rollout.G == 8 and rollout.sampling.max_new_tokens == 512
    assert rollout.rewards[:2] == [accuracy, think_format] and isinstance(rollout.rewards[2], OverlongPenalty)
    h, loop = cli.model.hparams, cli.model.settings
    if "gspo" in recipe:
        assert (h.eps_low, h.eps_high, h.beta, loop.mini_batches) == (3e-4, 4e-4, 0.0, 4)
        assert isinstance(rollout.engine, VLLMEngine) and rollout.engine.sleep  # vLLM on a GPU
    else:
        assert (h.eps_high, h.norm) == (0.28, "dapo") and rollout.dynamic_sampling
    assert "<answer>" in cli.datamodule.system_prompt
    cli.model.configure_model()
    trainable = [n for n, p in cli.model.backbone.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if family == "qwen3_5":  # the Gated-DeltaNet layers (three in four of a real checkpoint) get adapters too
        assert any(".linear_attn.in_proj_qkv.lora_" in n for n in trainable)
    _check_group_size(cli.model, rollout)
    if family == "qwen3_vl_moe":
        assert loop.router_aux_coef == 0.001 and moe_layout(cli.model.backbone.model) is not None


def test_real_ppo_recipe_instantiates_against_saved_tiny_folders(rm_folder, tmp_path, synthetic_dir):
    from lightning_vlm.objectives import RewardModelReward
    from lightning_vlm.rollout import RolloutCallback

    cli = VLMCLI(
        args=[
            "--config", str(ROOT / "zoo" / "qwen2vl_ppo.yaml"),
            "--model.init_args.backbone.model_name_or_path", str(ensure_tiny_vlm(TinyVLM(family="qwen2_vl"))),
            "--model.init_args.critic.model_name_or_path", str(rm_folder),
            "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--data.init_args.train", str(synthetic_dir / "prompt_train.jsonl"),
            "--data.init_args.columns", "{}",
        ],
        run=False,
    )  # fmt: skip
    (rollout,) = [c for c in cli.trainer.callbacks if isinstance(c, RolloutCallback)]
    (reward,) = rollout.rewards
    assert isinstance(reward, RewardModelReward) and reward.path == "runs/qwen2vl_rm/hf"
    h, loop = cli.model.hparams, cli.model.settings
    assert (h.kl_coef, h.kl, h.gamma, h.lam, h.cliprange, h.cliprange_value, h.vf_coef, loop.num_iterations) == (
        0.05, "k1", 1.0, 0.95, 0.2, 0.2, 0.1, 4)  # fmt: skip
    assert rollout.eval_sampling  # held-out samples: val/score and val/kl
    cli.model.configure_model()
    for part in (cli.model.backbone, cli.model.critic.backbone):
        trainable = [n for n, p in part.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    assert cli.model.critic.head.weight.requires_grad
    assert cli.model.backbone._reference is None  # LoRA: the reference is the policy without adapters
    _check_group_size(cli.model, rollout)


def test_tiny_moe_recipe_logs_a_router_loss(tmp_path, synthetic_dir):
    override = {
        "trainer": {"max_steps": 2, "limit_val_batches": 0, "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "moe"}},
                    "enable_progress_bar": False, "log_every_n_steps": 1,
                    "callbacks": [{"class_path": "lightning_vlm.rollout.RolloutCallback",
                                   "init_args": {"num_generations": 4, "max_new_tokens": 4, "table_every_n_steps": 0}}]},
        "data": {"init_args": {"synthetic": None, "train": str(synthetic_dir / "prompt_train.jsonl"), "val": None,
                               "batch_size": 2, "num_workers": 0}},
    }  # fmt: skip
    path = tmp_path / "moe_overrides.yaml"
    path.write_text(yaml.safe_dump(override))
    cli = VLMCLI(
        args=["fit", "--config", str(ROOT / "zoo" / "tiny_qwen3vl_moe_gspo.yaml"), "--config", str(path)]
    )
    assert cli.model.settings.router_aux_coef == 0.01
    aux = float(cli.trainer.callback_metrics["train/router_aux_loss"])
    assert math.isfinite(aux) and aux > 0  # top-2 routing: 2.0 when perfectly balanced
    csv_rows = (tmp_path / "moe").glob("**/metrics.csv")
    assert any("train/router_aux_loss" in p.read_text() for p in csv_rows)


def test_tiny_rlhf_pipeline_sft_rm_ppo_runs_from_the_cli(tmp_path, synthetic_dir, capsys):
    """The three stages of docs/ppo.md from the CLI, each a few steps: SFT, a reward model on preference
    pairs from the SFT export, then PPO from the SFT export with the reward model as reward and critic."""
    from lightning_vlm.objectives import RewardModelReward

    def run(recipe: str, stage: str, override: dict) -> VLMCLI:
        out = tmp_path / stage
        export = {"class_path": "lightning_vlm.export.ExportHF", "init_args": {"dirpath": str(out / "hf")}}
        trainer = {"max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1, "logger": False,
                   "default_root_dir": str(out), "enable_progress_bar": False}  # fmt: skip
        trainer.update(override.pop("trainer", {}))
        trainer["callbacks"] = [*trainer.get("callbacks", []), export]
        config = {"trainer": trainer, "report_held_out": stage == "ppo", **override}
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(config))
        return VLMCLI(args=["fit", "--config", str(ROOT / "zoo" / recipe), "--config", str(path)])

    def data(kind: str) -> dict:
        return {"init_args": {"synthetic": None, "train": str(synthetic_dir / f"{kind}_train.jsonl"),
                              "val": str(synthetic_dir / f"{kind}_val.jsonl"), "batch_size": 2,
                              "eval_batch_size": 2, "num_workers": 0}}  # fmt: skip

    run("tiny_qwen2vl_sft.yaml", "sft", {"data": data("sft")})
    sft = str(tmp_path / "sft" / "hf")
    run("tiny_qwen2vl_rm.yaml", "rm", {"data": data("pref"),
                                       "model": {"init_args": {"backbone": {"model_name_or_path": sft}}}})  # fmt: skip
    rm = str(tmp_path / "rm" / "hf")
    assert (tmp_path / "rm" / "hf" / "reward_head.safetensors").is_file()
    rollout = {"class_path": "lightning_vlm.rollout.RolloutCallback",
               "init_args": {"num_generations": 2, "max_new_tokens": 4, "table_every_n_steps": 0, "eval_sampling": True,
                             "rewards": [{"class_path": "lightning_vlm.objectives.RewardModelReward",
                                          "init_args": {"path": rm}}, "lightning_vlm.rollout.rewards.accuracy"],
                             "reward_weights": [1.0, 0.0]}}  # fmt: skip
    capsys.readouterr()
    cli = run("tiny_qwen2vl_ppo.yaml", "ppo", {
        "trainer": {"max_steps": 8, "val_check_interval": 1, "callbacks": [rollout], "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "ppo"), "name": "csv"}}},
        "data": data("prompt"),
        "model": {"init_args": {"backbone": {"model_name_or_path": sft}, "critic": {"model_name_or_path": rm}}},
    })  # fmt: skip
    assert cli.trainer.global_step == 8  # one rollout: 4 epochs x 2 mini-batches
    callback = next(c for c in cli.trainer.callbacks if hasattr(c, "rewards"))
    assert isinstance(callback.rewards[0], RewardModelReward) and callback.rewards[0].path == rm
    (csv,) = (tmp_path / "ppo" / "csv").glob("**/metrics.csv")
    header = csv.read_text().splitlines()[0].split(",")
    for key in ("objective/kl", "objective/scores", "value/explained_variance", "policy/clipfrac", "val/kl"):
        assert key in header, key
    out = capsys.readouterr().out
    assert "held-out metrics" in out and "val/score" in out and "val/kl" in out
    assert (tmp_path / "ppo" / "hf" / "config.json").is_file()


@pytest.mark.parametrize(
    "conversational, rewards",
    [(False, ["reward_len", "reward_func"]), (True, ["format_reward_func", "solution_reward"])],
)
def test_a_trl_reward_file_runs_unchanged_in_a_tiny_grpo_recipe(
    conversational, rewards, tmp_path, synthetic_dir
):
    """Reward functions written as TRL documents them (tests/helpers/trl_rewards.py), by import path, in
    GRPO from the command line: standard ones get the completions' texts, conversational ones (with
    ``conversational_completions``) one assistant message each; dataset columns arrive as keywords."""
    rows = [json.loads(line) for line in (synthetic_dir / "prompt_train.jsonl").read_text().splitlines()[:4]]
    with (tmp_path / "trl.jsonl").open("w") as f:  # a TRL-style dataset: `solution`/`ground_truth` columns
        for r in rows:
            r["images"] = [str(synthetic_dir / p) for p in r["images"]]
            f.write(json.dumps({**r, "solution": r["answer"], "ground_truth": r["answer"]}) + "\n")
    rollout = {"num_generations": 2, "max_new_tokens": 4, "table_every_n_steps": 1,
               "conversational_completions": conversational,
               "rewards": [f"tests.helpers.trl_rewards.{name}" for name in rewards]}  # fmt: skip
    override = _gspo_override(tmp_path, synthetic_dir, rollout)
    config = yaml.safe_load(override.read_text())
    config["trainer"].update(max_steps=1, limit_val_batches=0)
    config["model"]["class_path"] = "lightning_vlm.objectives.GRPO"
    config["data"]["init_args"].update(train=str(tmp_path / "trl.jsonl"), val=None)
    override.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(GSPO_RECIPE), "--config", str(override)])
    assert "class_path: lightning_vlm.objectives.GRPO" in (tmp_path / "config.yaml").read_text()
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert records and all(set(rewards) <= set(r) for r in records)
    for r in records:
        if conversational:
            assert r["format_reward_func"] in (0.0, 1.0) and r["solution_reward"] in (-1.0, 0.0, 1.0)
        else:  # the texts themselves: the length reward matches each logged completion
            assert r["reward_len"] == -abs(20 - len(r["completion"])) and r["reward_func"] == 0.0
