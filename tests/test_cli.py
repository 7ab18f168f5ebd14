"""The lightning-vlm command: recipes parse, typos fail naming the key, fit/validate/predict run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_vlm.cli import VLMCLI, main
from lightning_vlm.tiny import TinyVLM, ensure_tiny_vlm

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "zoo" / "tiny_qwen2vl_sft.yaml"


def _tiny_args(tmp_path: Path, synthetic_dir: Path, *extra: str, checkpoint: dict | None = None) -> list[str]:
    """The offline tiny recipe, pointed at the test's synthetic data and a temporary run folder."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "dirpath": str(tmp_path / "checkpoints"),
        "save_last": True,
        **(checkpoint or {"every_n_train_steps": 2}),
    }
    callbacks = [
        {"class_path": "lightning_vlm.callbacks.ExportHF", "init_args": {"dirpath": str(tmp_path / "hf")}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint},
    ]
    override = tmp_path / "test_overrides.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return [
        "--config", str(TINY),
        "--config", str(override),
        "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2",
        "--report_held_out", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.synthetic", "null",
        "--data.init_args.train", str(synthetic_dir / "sft_train.jsonl"),
        "--data.init_args.val", str(synthetic_dir / "sft_val.jsonl"),
        "--data.init_args.num_workers", "0",
        "--data.init_args.eval_batch_size", "16",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "zoo").glob("*.yaml")))
def test_every_zoo_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "zoo" / recipe), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lightning_vlm.objectives.")
    assert printed["data"]["class_path"].startswith("lightning_vlm.data.")


@pytest.mark.parametrize("fragment", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_hardware_fragment_stacks_on_a_recipe(fragment, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(TINY), "--config", str(ROOT / "configs" / fragment), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    wanted = yaml.safe_load((ROOT / "configs" / fragment).read_text())["trainer"]
    assert printed["trainer"]["precision"] == wanted["precision"]


@pytest.mark.parametrize(
    "where, key",
    [
        ("model.init_args.backbone.tiny", "hiden_size"),
        ("model.init_args.backbone", "lora_rank"),
        ("model.init_args", "learning_rate"),
        ("data.init_args", "batchsize"),
    ],
)
def test_typo_in_any_nested_key_fails_at_parse_time_naming_it(where, key, tmp_path, capsys):
    config = yaml.safe_load(TINY.read_text())
    node = config
    for part in where.split("."):
        node = node[part]
    node[key] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(bad), "--print_config"])
    assert exit_.value.code not in (0, None)
    assert key in capsys.readouterr().err


def test_help_documents_arguments(capsys):
    with pytest.raises(SystemExit):
        main(
            ["fit", "--model", "lightning_vlm.objectives.SFT", "--model.help", "lightning_vlm.objectives.SFT"]
        )
    out = capsys.readouterr().out
    assert "Tokens generated per held-out answer" in out  # from the SFT docstring
    assert "Peak learning rate" in out  # inherited from the shared base
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "fit" in capsys.readouterr().out


def _initial_weights() -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    folder = ensure_tiny_vlm(TinyVLM(family="qwen2_vl", hidden_size=128, num_layers=2))
    return dict(AutoModelForImageTextToText.from_pretrained(folder).named_parameters())


def test_fit_tiny_recipe_trains_reports_and_saves(tmp_path, synthetic_dir, capsys):
    args = _tiny_args(
        tmp_path, synthetic_dir, "--model.init_args.backbone.vision", "frozen", "--report_held_out", "true"
    )
    cli = VLMCLI(args=["fit", *args])
    out = capsys.readouterr().out
    assert "held-out metrics" in out and "val/accuracy" in out
    assert cli.trainer.global_step == 4

    initial = _initial_weights()
    model = cli.model.backbone.model
    trained = {n: p for n, p in model.named_parameters()}
    vision = {n for n in trained if n.startswith("model.visual.")}
    assert vision and all(torch.equal(trained[n], initial[n]) for n in vision)  # frozen stayed put
    language = [n for n in trained if n not in vision]
    changed = [n for n in language if not torch.equal(trained[n], initial[n])]
    assert len(changed) == len(language)  # every trainable tensor moved

    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["model"]["init_args"]["backbone"]["vision"] == "frozen"  # resolved config saved
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys == {f"backbone.model.{n}" for n in language}  # trainable weights only
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B wrote an offline run"
    assert (tmp_path / "hf" / "config.json").is_file()  # ExportHF from the recipe


def test_validate_and_predict_from_checkpoint(tmp_path, synthetic_dir, capsys):
    fitted = VLMCLI(args=["fit", *_tiny_args(tmp_path, synthetic_dir, "--trainer.val_check_interval", "4")])
    after_fit = float(fitted.trainer.callback_metrics["val/loss"])  # validated at step 4, the last
    config_before = (tmp_path / "config.yaml").read_text()
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    cli = VLMCLI(args=["validate", *_tiny_args(tmp_path, synthetic_dir), "--ckpt_path", str(ckpt)])
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/accuracy"]) <= 1.0
    assert math.isclose(float(metrics["val/loss"]), after_fit, rel_tol=1e-5)  # the checkpoint's weights
    cli = VLMCLI(args=["test", *_tiny_args(tmp_path, synthetic_dir, "--data.init_args.test",
                                           str(synthetic_dir / "sft_val.jsonl")), "--ckpt_path", str(ckpt)])  # fmt: skip
    assert math.isclose(float(cli.trainer.callback_metrics["test/loss"]), after_fit, rel_tol=1e-5)
    assert (tmp_path / "config.yaml").read_text() == config_before  # validate/test keep the fit config

    out_file = tmp_path / "preds.jsonl"
    VLMCLI(
        args=[
            "predict",
            *_tiny_args(tmp_path, synthetic_dir),
            "--ckpt_path",
            str(ckpt),
            "--predictions.path",
            str(out_file),
        ]
    )
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    val = [json.loads(line) for line in (synthetic_dir / "sft_val.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(len(val)))
    assert [r["reference"] for r in rows] == [v["messages"][-1]["content"][0]["text"] for v in val]
    assert all(isinstance(r["completion"], str) for r in rows)


@pytest.mark.parametrize(
    "stop, checkpoint",
    [
        (2, {"every_n_train_steps": 2}),  # mid-epoch, after a training batch
        (
            2,
            {"every_n_train_steps": 0, "every_n_epochs": 1, "save_on_train_epoch_end": False},
        ),  # after a mid-epoch validation
    ],
    # Not listed: checkpoints saved in on_train_epoch_end. Lightning 2.6 replays a partial epoch after
    # them, so weights, optimiser and step are restored but later batches come in another order.
    ids=["mid-epoch", "after-validation"],
)
def test_interrupted_run_resumes_to_the_same_weights(stop, checkpoint, tmp_path, synthetic_dir):
    """Stop, resume to 5 steps (epochs of 3 batches) == 5 steps straight through."""
    straight = VLMCLI(args=["fit", *_tiny_args(tmp_path / "a", synthetic_dir, "--trainer.max_steps", "5")])
    first = _tiny_args(tmp_path / "b", synthetic_dir, "--trainer.max_steps", str(stop), checkpoint=checkpoint)
    VLMCLI(args=["fit", *first])
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == stop
    resumed = VLMCLI(
        args=[
            "fit",
            *_tiny_args(tmp_path / "c", synthetic_dir, "--trainer.max_steps", "5"),
            "--ckpt_path",
            str(ckpt),
        ]
    )
    assert (
        resumed.trainer.global_step == 5 and resumed.trainer.current_epoch == straight.trainer.current_epoch
    )
    a = straight.model.state_dict()
    b = resumed.model.state_dict()
    trainable = set(straight.model.trainable_named_parameters())
    assert trainable and all(torch.equal(a[k], b[k]) for k in trainable)


def test_checkpoint_written_from_python_loads(tmp_path, synthetic_dir):
    import lightning as L

    from lightning_vlm import BackboneConfig, LoraSettings
    from lightning_vlm.data import SFTDataModule
    from lightning_vlm.objectives import SFT

    module = SFT(BackboneConfig(tiny=TinyVLM(), lora=LoraSettings(r=4)), eval_max_new_tokens=3, lr=1e-2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=8))
    trainer.save_checkpoint(tmp_path / "py.ckpt")
    loaded = SFT.load_from_checkpoint(tmp_path / "py.ckpt")
    assert loaded.hparams.eval_max_new_tokens == 3 and loaded.backbone.config.lora.r == 4
    trained = module.trainable_named_parameters()
    assert all(torch.equal(p, trained[n]) for n, p in loaded.trainable_named_parameters().items())


def test_real_recipe_instantiates_against_a_saved_tiny_folder(tmp_path, synthetic_dir):
    folder = ensure_tiny_vlm(TinyVLM(family="qwen2_vl"))
    cli = VLMCLI(
        args=[
            "--config", str(ROOT / "zoo" / "qwen2vl_sft.yaml"),
            "--model.init_args.backbone.model_name_or_path", str(folder),
            "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--data.init_args.train", str(synthetic_dir / "sft_train.jsonl"),
            "--data.init_args.val", str(synthetic_dir / "sft_val.jsonl"),
        ],
        run=False,
    )  # fmt: skip
    backbone = cli.model.backbone
    cli.model.configure_model()
    trainable = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(getattr(m, "gradient_checkpointing", False) for m in backbone.model.modules())
    assert backbone.processor.image_processor.size["longest_edge"] == 1003520
    assert cli.trainer.accumulate_grad_batches == 4


@pytest.mark.parametrize(
    "logger, produced",
    [
        ("lightning.pytorch.loggers.CSVLogger", "**/metrics.csv"),
        ("lightning.pytorch.loggers.TensorBoardLogger", "**/events.out.tfevents.*"),
    ],
)
def test_csv_and_tensorboard_loggers_work(logger, produced, tmp_path, synthetic_dir):
    override = tmp_path / "logger.yaml"
    override.write_text(
        yaml.safe_dump(
            {"trainer": {"logger": {"class_path": logger, "init_args": {"save_dir": str(tmp_path / "logs")}}}}
        )
    )
    VLMCLI(
        args=[
            "fit",
            *_tiny_args(
                tmp_path, synthetic_dir, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1"
            ),
            "--config",
            str(override),
        ]
    )
    files = list((tmp_path / "logs").glob(produced))
    assert files, f"{logger} wrote nothing"
    if produced.endswith(".csv"):
        text = files[0].read_text()
        assert "train/loss" in text and "val/accuracy" in text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line.strip() for line in readme.splitlines() if line.strip().endswith("pytest -q"))
    assert command in ci
    quickstart = next(
        line.strip() for line in readme.splitlines() if "fit --config zoo/tiny_qwen2vl_sft.yaml" in line
    )
    configs = [part.split()[0] for part in quickstart.split("--config ")[1:]]
    assert configs == [
        "zoo/tiny_qwen2vl_sft.yaml",
        "zoo/tiny_qwen2vl_gspo.yaml",
    ]  # SFT, then GSPO from its export
    assert all((ROOT / c).is_file() for c in configs)


# ---------------------------------------------------------------- online RL through the CLI
GSPO_RECIPE = ROOT / "zoo" / "tiny_qwen2vl_gspo.yaml"


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
    from lightning_vlm.rewards import OverlongPenalty, accuracy
    from lightning_vlm.rollout import RolloutCallback

    rollout = {"num_generations": 4, "max_new_tokens": 4, "table_every_n_steps": 1,
               "rewards": ["lightning_vlm.rewards.accuracy",
                           {"class_path": "lightning_vlm.rewards.OverlongPenalty",
                            "init_args": {"max_length": 4, "cache": 2}}]}  # fmt: skip
    override = _gspo_override(tmp_path, synthetic_dir, rollout)
    cli = VLMCLI(args=["fit", "--config", str(GSPO_RECIPE), "--config", str(override)])
    assert cli.trainer.global_step == 2  # one rollout, model.mini_batches = 2 optimiser steps
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
    ],
)
def test_real_online_recipes_instantiate_against_a_saved_tiny_folder(recipe, family, tmp_path, synthetic_dir):
    from lightning_vlm.moe import moe_layout
    from lightning_vlm.rewards import OverlongPenalty, accuracy, think_format
    from lightning_vlm.rollout import RolloutCallback

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
    assert rollout.G == 8 and rollout.sampling["max_new_tokens"] == 512
    assert rollout.rewards[:2] == [accuracy, think_format] and isinstance(rollout.rewards[2], OverlongPenalty)
    h = cli.model.hparams
    if "gspo" in recipe:
        assert (h.eps_low, h.eps_high, h.beta, h.mini_batches) == (3e-4, 4e-4, 0.0, 4)
    else:
        assert (h.eps_high, h.norm) == (0.28, "dapo") and rollout.dynamic_sampling
    assert "<answer>" in cli.datamodule.system_prompt
    cli.model.configure_model()
    trainable = [n for n, p in cli.model.backbone.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    rollout.on_fit_start(cli.trainer, cli.model)  # the group size fits mini_batches x accumulation
    if family == "qwen3_vl_moe":
        assert h.router_aux_coef == 0.001 and moe_layout(cli.model.backbone.model) is not None


def test_real_ppo_recipe_instantiates_against_saved_tiny_folders(rm_folder, tmp_path, synthetic_dir):
    from lightning_vlm.rewards import RewardModelReward
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
    h = cli.model.hparams
    assert (h.kl_coef, h.kl, h.gamma, h.lam, h.cliprange, h.cliprange_value, h.vf_coef, h.num_iterations) == (
        0.05, "k1", 1.0, 0.95, 0.2, 0.2, 0.1, 4)  # fmt: skip
    cli.model.configure_model()
    for part in (cli.model.backbone, cli.model.critic.backbone):
        trainable = [n for n, p in part.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    assert cli.model.critic.head.weight.requires_grad
    assert cli.model.backbone._reference is None  # LoRA: the reference is the policy without adapters
    rollout.on_fit_start(cli.trainer, cli.model)  # the group size fits mini_batches x accumulation


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
    assert cli.model.hparams.router_aux_coef == 0.01
    aux = float(cli.trainer.callback_metrics["train/router_aux_loss"])
    assert math.isfinite(aux) and aux > 0  # top-2 routing: 2.0 when perfectly balanced
    csv_rows = (tmp_path / "moe").glob("**/metrics.csv")
    assert any("train/router_aux_loss" in p.read_text() for p in csv_rows)


def test_torch_threads_is_applied_before_the_model_is_built(tmp_path, synthetic_dir):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        VLMCLI(args=[*_tiny_args(tmp_path, synthetic_dir)[:2], "--torch_threads", "1"], run=False)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        VLMCLI(args=_tiny_args(tmp_path, synthetic_dir)[:2], run=False)  # the recipe pins it too
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_tiny_rlhf_pipeline_sft_rm_ppo_runs_from_the_cli(tmp_path, synthetic_dir, capsys):
    """The three stages of docs/ppo.md from the CLI, each a few steps: SFT, a reward model on preference
    pairs from the SFT export, then PPO from the SFT export with the reward model as reward and critic."""
    from lightning_vlm.rewards import RewardModelReward

    def run(recipe: str, stage: str, override: dict) -> VLMCLI:
        out = tmp_path / stage
        export = {"class_path": "lightning_vlm.callbacks.ExportHF", "init_args": {"dirpath": str(out / "hf")}}
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
               "init_args": {"num_generations": 2, "max_new_tokens": 4, "table_every_n_steps": 0,
                             "rewards": [{"class_path": "lightning_vlm.rewards.RewardModelReward",
                                          "init_args": {"path": rm}}, "lightning_vlm.rewards.accuracy"],
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
