"""The lightning-vlm command: recipes parse, typos fail naming the key, fit/validate/predict run."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_vlm.cli import VLMCLI, main
from lightning_vlm.model.tiny import TinyVLM, ensure_tiny_vlm

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
        {"class_path": "lightning_vlm.export.ExportHF", "init_args": {"dirpath": str(tmp_path / "hf")}},
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
    monitors = [c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith(".LearningRateMonitor")]
    assert [m["init_args"]["logging_interval"] for m in monitors] == ["step"]  # train/lr in every recipe
    trainer = printed["trainer"]  # one setting names the run folder; nothing else hard-codes a path
    assert trainer["default_root_dir"] == f"runs/{Path(recipe).stem}"
    assert trainer["logger"]["init_args"]["save_dir"] in (None, ".")
    folders = {c["class_path"].rpartition(".")[2]: c.get("init_args", {}) for c in trainer["callbacks"]}
    assert "ExportHF" in folders and "ModelCheckpoint" in folders
    assert folders["ExportHF"]["dirpath"] is None and folders["ModelCheckpoint"]["dirpath"] is None


def test_a_recipe_without_its_logger_drops_the_lr_monitor(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor

    def monitors(*extra: str) -> int:
        args = ["--config", str(TINY), "--trainer.default_root_dir", str(tmp_path), *extra]
        return sum(isinstance(c, LearningRateMonitor) for c in VLMCLI(args=args, run=False).trainer.callbacks)

    assert monitors("--trainer.logger.init_args.save_dir", str(tmp_path)) == 1
    assert monitors("--trainer.logger", "false") == 0  # it would refuse to start: nothing to log into


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
        main(["fit", "--data.help", "lightning_vlm.data.SFTDataModule"])
    out = capsys.readouterr().out
    assert "--data.packing" in out and "Token budget of a packed micro-batch" in out and "--data.batch_size" in out
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
def test_interrupted_run_resumes_to_the_same_weights(stop, checkpoint, tmp_path, synthetic_dir, recwarn):
    """Stop, resume to 5 steps (epochs of 3 batches) == 5 steps straight through; Lightning's warning that
    the loader is "not resumable" does not show, since the sampler resumes."""
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
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
    kept = [f for f in warnings.filters if f[1] and "resuming from a checkpoint" in f[1].pattern]
    assert not kept  # the silencing ends with the resumed epoch's first batch
    a = straight.model.state_dict()
    b = resumed.model.state_dict()
    trainable = set(straight.model.trainable_named_parameters())
    assert trainable and all(torch.equal(a[k], b[k]) for k in trainable)


def test_packed_sft_fits_and_resumes_to_the_same_weights(tmp_path, synthetic_dir, monkeypatch):
    """SFT with data.packing from the command: every training forward is one packed sequence of at most
    max_tokens tokens; stopped after 2 steps and resumed to 5, it ends where 5 straight steps do."""
    from lightning_vlm.model import backbone

    seen = []

    def spy(inner, input_ids, attention_mask, vision):
        seen.append(int(attention_mask.sum()))
        return packed_hidden(inner, input_ids, attention_mask, vision)

    packed_hidden = backbone.packed_hidden
    monkeypatch.setattr(backbone, "packed_hidden", spy)
    packing = ("--data.init_args.packing", "true", "--data.init_args.max_tokens", "512",
               "--data.init_args.max_length", "256", "--trainer.max_steps", "5")  # fmt: skip
    straight = VLMCLI(args=["fit", *_tiny_args(tmp_path / "a", synthetic_dir, *packing)])
    assert straight.trainer.global_step == 5 and len(seen) == 5 and max(seen) <= 512 and min(seen) > 256
    first = _tiny_args(tmp_path / "b", synthetic_dir, *packing, "--trainer.max_steps", "2")
    VLMCLI(args=["fit", *first])
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["datamodule_hyper_parameters"]["packing"] is True
    args = [*_tiny_args(tmp_path / "c", synthetic_dir, *packing), "--ckpt_path", str(ckpt)]
    resumed = VLMCLI(args=["fit", *args])
    assert resumed.trainer.global_step == 5
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    trainable = set(straight.model.trainable_named_parameters())
    assert trainable and all(torch.equal(a[k], b[k]) for k in trainable)


def test_resuming_with_another_objectives_checkpoint_names_both(
    objective_checkpoints, tmp_path, synthetic_dir, capfd
):
    """A DPO checkpoint given to the SFT recipe used to switch the run to DPO silently (then KeyError: 'copies')."""
    dpo = objective_checkpoints["dpo"]
    for command in ("fit", "validate"):
        with pytest.raises(SystemExit) as exit_:
            main(
                [
                    command,
                    *_tiny_args(tmp_path, synthetic_dir, "--trainer.max_steps", "3"),
                    "--ckpt_path",
                    str(dpo),
                ]
            )
        assert exit_.value.code == 2
        err = capfd.readouterr().err
        assert str(dpo) in err and "saved by the DPO objective" in err and "recipe's model is SFT" in err


def test_objective_refuses_another_objectives_checkpoint_in_python(objective_checkpoints, synthetic_dir):
    import lightning as L

    from lightning_vlm import BackboneConfig
    from lightning_vlm.data import SFTDataModule
    from lightning_vlm.objectives import SFT

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)  # fmt: skip
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=4)
    with pytest.raises(ValueError, match=r"dpo\.ckpt was saved by the objective .*DPO, not by .*SFT"):
        trainer.fit(SFT(BackboneConfig(tiny=TinyVLM())), dm, ckpt_path=objective_checkpoints["dpo"])


@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint\n", bytes(range(256)) * 8], ids=["empty", "text", "bytes"]
)
def test_unreadable_checkpoint_is_named_and_never_loaded_unsafely(content, tmp_path, synthetic_dir, capfd):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *_tiny_args(tmp_path, synthetic_dir), "--ckpt_path", str(bad)])
    assert exit_.value.code == 2
    err = capfd.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and f"--ckpt_path {bad}:" in err
    assert "weights_only" not in err


@pytest.mark.parametrize(
    "override, culprit",
    [
        ({"model": {"init_args": {"backbone": {"tiny": None, "model_name_or_path": "/no/such/model"}}}},
         "backbone.model_name_or_path: no model folder at /no/such/model"),
        ({"model": {"init_args": {"lr": -1.0}}}, "model.init_args.lr must be > 0, got -1.0"),
        ({"data": {"init_args": {"packing": True}}},
         "data.init_args.max_tokens must be >= max_length (256) with packing, got None"),
    ],
    ids=["model-path", "negative-lr", "packing-without-budget"],
)  # fmt: skip
def test_bad_setting_is_the_first_and_last_line_printed(override, culprit, tmp_path):
    """As a user sees it: the command in a process of its own, everything it prints."""
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(override))
    done = subprocess.run([sys.executable, "-m", "lightning_vlm.cli", "fit", "--config", str(TINY), "--config", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and lines == [f"error: {culprit}"], lines[:3] + ["..."] + lines[-3:]


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


def _sft_recipe(recipe: str, family: str, scope: str, tmp_path, synthetic_dir):
    """A real GPU SFT recipe parsed and built on a saved tiny folder of its family, CPU fp32: LoRA on the
    language model's seven projections only (``scope`` is its module name), gradient checkpointing on."""
    folder = ensure_tiny_vlm(TinyVLM(family=family))
    cli = VLMCLI(
        args=[
            "--config", str(ROOT / "zoo" / recipe),
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
    assert trainable and all("lora_" in n and scope in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(getattr(m, "gradient_checkpointing", False) for m in backbone.model.modules())
    return cli, backbone


def test_real_recipe_instantiates_against_a_saved_tiny_folder(tmp_path, synthetic_dir):
    cli, backbone = _sft_recipe("qwen2vl_sft.yaml", "qwen2_vl", ".language_model.", tmp_path, synthetic_dir)
    assert backbone.processor.image_processor.size["longest_edge"] == 1003520
    assert cli.trainer.accumulate_grad_batches == 4


def test_smolvlm2_recipe_instantiates_against_the_saved_tiny_smolvlm_folder(tmp_path, synthetic_dir):
    """zoo/smolvlm2_sft.yaml (SmolVLM2-2.2B-Instruct): the SigLIP tower has q/k/v_proj too and stays frozen;
    its tile size setting."""
    _, backbone = _sft_recipe("smolvlm2_sft.yaml", "smolvlm", ".text_model.", tmp_path, synthetic_dir)
    assert backbone.processor.image_processor.size["longest_edge"] == 1152
    assert backbone.model.config.model_type == "smolvlm"


def test_gemma3_sft_recipe_instantiates_against_a_local_gemma3_folder(tmp_path, synthetic_dir):
    """zoo/gemma3_sft.yaml in place of google/gemma-3-4b-it: SigLIP and the projector frozen, bf16 weights."""
    cli, backbone = _sft_recipe("gemma3_sft.yaml", "gemma3", ".language_model.", tmp_path, synthetic_dir)
    assert type(backbone.model.get_base_model()).__name__ == "Gemma3ForConditionalGeneration"
    assert type(backbone.processor).__name__ == "Gemma3Processor"
    assert next(p for n, p in backbone.model.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
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
    lines = [line.strip() for line in ci.splitlines()]
    steps = [step.strip() for step in command.split(" && ")]  # each step of it, in order, in CI
    at = [next(i for i, line in enumerate(lines) if step in line) for step in steps]
    assert at == sorted(at) and lines[at[-1]] == steps[-1], (steps, lines)
    vllm = next(line.strip() for line in readme.splitlines() if line.strip().startswith("bash .ci/vllm-venv"))
    vllm_at = [next(i for i, line in enumerate(lines) if line.startswith(step)) for step in vllm.split(" && ")]
    assert vllm_at == sorted(vllm_at) and vllm_at[0] > at[-1], (vllm, lines)  # the vLLM venv's tests, after
    quickstart = next(
        line.strip() for line in readme.splitlines() if "fit --config zoo/tiny_qwen2vl_sft.yaml" in line
    )
    configs = [part.split()[0] for part in quickstart.split("--config ")[1:]]
    assert configs == [
        "zoo/tiny_qwen2vl_sft.yaml",
        "zoo/tiny_qwen2vl_gspo.yaml",
    ]  # SFT, then GSPO from its export
    assert all((ROOT / c).is_file() for c in configs)


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


def test_a_module_in_the_current_directory_needs_no_pythonpath(tmp_path):
    """As the console script runs: its folder, not the current directory, is first on the path."""
    import subprocess
    import sys

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "lightning-vlm").write_text("from lightning_vlm.cli import main\nmain()\n")
    (tmp_path / "my_callbacks.py").write_text("import lightning as L\n\nclass Marker(L.Callback):\n    pass\n")
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    override = tmp_path / "mine.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "my_callbacks.Marker"},
        {"class_path": "lightning_vlm.rollout.RolloutCallback", "init_args": {"rewards": ["my_rewards.short"]}},
    ]}}))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # our checkout only: not the current directory
    done = subprocess.run(
        [sys.executable, str(tmp_path / "bin" / "lightning-vlm"), "fit", "--config", str(ROOT / "zoo" / "tiny_qwen2vl_gspo.yaml"),
         "--config", str(override), "--print_config"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "my_callbacks.Marker" in done.stdout and "my_rewards.short" in done.stdout


def test_help_imports_nothing_heavy_it_does_not_use():
    """``--help`` needs Lightning (its parser is LightningCLI's) but not W&B, datasets, peft or any model code."""
    import subprocess
    import sys

    heavy = ["wandb", "datasets", "peft", "transformers.modeling_utils", "tensorboard"]
    script = (
        "import sys\nfrom lightning_vlm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print([m for m in {heavy!r} if m in sys.modules], file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert "fit" in done.stdout and done.stderr.strip().splitlines()[-1] == "[]", done.stderr[-2000:]
