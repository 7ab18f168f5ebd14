"""The offline preference recipes (DPO, MPO, reward model) from the command line: they train, MPO
resumes with the same delta, and the real recipes instantiate against a saved tiny folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone

ROOT = Path(__file__).resolve().parents[3]


def _recipe_args(objective: str, tmp_path: Path, synthetic_dir: Path, *extra: str) -> list[str]:
    """The offline tiny recipe on the test's data, starting from a tiny model (the SFT export's stand-in)."""
    import yaml

    from lightning_vlm.model.tiny import ensure_tiny_vlm

    tmp_path.mkdir(parents=True, exist_ok=True)
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning_vlm.export.ExportHF", "init_args": {"dirpath": str(tmp_path / "hf")}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "every_n_train_steps": 2}},
    ]}}))  # fmt: skip
    start = ensure_tiny_vlm(TinyVLM(hidden_size=128, num_layers=2))
    return [
        "--config", str(ROOT / "zoo" / f"tiny_qwen2vl_{objective}.yaml"), "--config", str(override),
        "--model.init_args.backbone.model_name_or_path", str(start),
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--report_held_out", "false",
        "--data.init_args.synthetic", "null", "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "8",
        "--data.init_args.train", str(synthetic_dir / "pref_train.jsonl"),
        "--data.init_args.val", str(synthetic_dir / "pref_val.jsonl"),
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("objective", ["dpo", "mpo", "rm"])
def test_tiny_recipe_trains_from_the_cli(objective, tmp_path, synthetic_dir, capsys):
    from lightning_vlm.cli import VLMCLI

    args = _recipe_args(objective, tmp_path, synthetic_dir, "--report_held_out", "true")
    initial = VLMBackbone(
        BackboneConfig(
            model_name_or_path=args[args.index("--model.init_args.backbone.model_name_or_path") + 1]
        )
    )
    initial.load()
    cli = VLMCLI(args=["fit", *args])
    assert cli.trainer.global_step == 3
    out = capsys.readouterr().out
    held_out = "val/accuracy" if objective == "rm" else "val/rewards/accuracies"
    assert "held-out metrics" in out and held_out in out
    if objective == "mpo":
        assert {"val/loss/quality", "val/loss/generation", "val/delta"} <= set(cli.trainer.callback_metrics)
    module = cli.model
    first = dict(initial.model.named_parameters())
    for name, p in module.backbone.model.named_parameters():
        assert torch.equal(p, first[name]) != p.requires_grad, name  # trained moved, frozen stayed
    if module.backbone._reference is not None:
        assert all(torch.equal(p, first[n]) for n, p in module.backbone._reference.named_parameters())
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert (tmp_path / "hf" / "reward_head.safetensors").is_file() == (objective == "rm")


def test_interrupted_mpo_run_resumes_with_the_same_delta(tmp_path, synthetic_dir):
    from lightning_vlm.cli import VLMCLI

    straight = VLMCLI(
        args=["fit", *_recipe_args("mpo", tmp_path / "a", synthetic_dir, "--trainer.max_steps", "4")]
    )
    VLMCLI(args=["fit", *_recipe_args("mpo", tmp_path / "b", synthetic_dir, "--trainer.max_steps", "2")])
    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 2 and saved["mpo_delta"]["count"] == 2
    resumed = VLMCLI(args=["fit", *_recipe_args("mpo", tmp_path / "c", synthetic_dir, "--trainer.max_steps", "4"),
                           "--ckpt_path", str(ckpt)])  # fmt: skip
    assert resumed.model.delta_count == straight.model.delta_count == 4
    assert resumed.model.delta == straight.model.delta != 0.0
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in straight.model.trainable_named_parameters())


@pytest.mark.parametrize("objective", ["dpo", "mpo", "rm"])
def test_real_recipe_instantiates_against_a_saved_tiny_folder(objective, tmp_path):
    from lightning_vlm.cli import VLMCLI
    from lightning_vlm.model.tiny import ensure_tiny_vlm

    folder = ensure_tiny_vlm(TinyVLM(family="qwen2_vl"))
    cli = VLMCLI(
        args=[
            "--config", str(ROOT / "zoo" / f"qwen2vl_{objective}.yaml"),
            "--model.init_args.backbone.model_name_or_path", str(folder),
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        ],
        run=False,
    )  # fmt: skip
    module = cli.model
    module.configure_model()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    expected_extra = {"head.weight", "head.bias"} if objective == "rm" else set()
    assert {n for n in trainable if "lora_" not in n} == expected_extra
    assert cli.datamodule.columns == {"images": "image", "prompt": "question"}
    assert module.backbone._reference is None  # LoRA: the reference is the disabled adapters
    if objective == "mpo":
        h = module.hparams
        assert (h.preference_weight, h.quality_weight, h.generation_weight) == (0.8, 0.2, 1.0)
