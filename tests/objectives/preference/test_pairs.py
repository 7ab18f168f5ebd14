"""Preference data and objectives: batch layout, public layouts, bad rows, vision once, reference
log-probs (live, cached, fixed), MPO's delta, the reward model's export."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM, VLMBackbone
from lightning_vlm.data import PreferenceDataModule
from lightning_vlm.data.rows import BadRowError
from lightning_vlm.objectives import DPO, MPO, RewardModel


@pytest.fixture(scope="module")
def backbone():
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM()))
    bb.load()
    return bb


def _dm(processor, source, **kw) -> PreferenceDataModule:
    dm = PreferenceDataModule(train=str(source), batch_size=kw.pop("batch_size", 4), **kw)
    dm.processor = processor
    dm.setup("fit")
    return dm


def _first(dm) -> dict:
    return next(iter(dm._loader("train", dm._collator("train"), shuffle=False)))


def _fit(module, synthetic_dir, steps=2, callbacks=(), **trainer):
    dm = PreferenceDataModule(
        train=str(synthetic_dir / "pref_train.jsonl"), val=str(synthetic_dir / "pref_val.jsonl"), batch_size=4
    )
    trainer = {"limit_val_batches": 1, **trainer}
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                        **trainer)  # fmt: skip
    trainer.fit(module, dm)
    return trainer


# ---------------------------------------------------------------- data
def test_batch_is_chosen_block_then_rejected_block_with_completion_labels(backbone, synthetic_dir):
    dm = _dm(backbone.processor, synthetic_dir / "pref_train.jsonl")
    batch = _first(dm)
    rows = [json.loads(line) for line in (synthetic_dir / "pref_train.jsonl").read_text().splitlines()][:4]
    assert batch["copies"] == 2 and batch["rows"] == [0, 1, 2, 3] and batch["split"] == "train"
    assert batch["input_ids"].shape[0] == 8
    tok = backbone.tokenizer
    for k, row in enumerate(rows):
        for block, key in ((0, "chosen"), (1, "rejected")):
            i = block * 4 + k
            labelled = tok.decode(batch["input_ids"][i][batch["labels_mask"][i]])
            assert labelled == row[key][0]["content"][0]["text"] + "<|im_end|>"
        # the prompt part (everything before the labels) is the same text in both sequences
        prompts = []
        for i in (k, 4 + k):
            am, lm = batch["attention_mask"][i].bool(), batch["labels_mask"][i]
            first = int(lm.nonzero()[0])
            prompts.append(batch["input_ids"][i][:first][am[:first]].tolist())
        assert prompts[0] == prompts[1]
    # images are processed once per pair: the grid lists 4 images, not 8
    assert batch["vision"]["image_grid_thw"].shape[0] == sum(len(r["images"]) for r in rows)
    assert batch["vision"]["mm_token_type_ids"].shape == batch["input_ids"].shape

    per_seq = _first(_dm(backbone.processor, synthetic_dir / "pref_train.jsonl", vision_once=False))
    assert per_seq["copies"] == 1
    assert per_seq["vision"]["image_grid_thw"].shape[0] == 2 * batch["vision"]["image_grid_thw"].shape[0]
    assert torch.equal(per_seq["labels_mask"].sum(-1), batch["labels_mask"].sum(-1))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _image(folder: Path, name: str = "a.png") -> str:
    Image.new("RGB", (56, 56), "red").save(folder / name)
    return name


def test_rlaif_v_and_mmpr_layouts_give_the_same_batch(backbone, tmp_path):
    img = _image(tmp_path)
    ours = _write(tmp_path / "ours.jsonl", [{
        "images": [img],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": "blue"}],
    }])  # fmt: skip
    rlaif = _write(tmp_path / "rlaif.jsonl", [
        {"image": img, "question": "What colour?", "chosen": "red", "rejected": "blue", "ds_name": "x"}
    ])  # fmt: skip
    mmpr = _write(tmp_path / "mmpr.jsonl", [
        {"image": img, "question": "<image>\nWhat colour?", "chosen": "red", "rejected": "blue"}
    ])  # fmt: skip
    columns = {"images": "image", "prompt": "question"}
    want = _first(_dm(backbone.processor, ours))
    for source in (rlaif, mmpr):
        got = _first(_dm(backbone.processor, source, columns=columns))
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["labels_mask"], want["labels_mask"])
        assert torch.equal(got["vision"]["pixel_values"], want["vision"]["pixel_values"])


def test_multi_turn_prompt_labels_only_the_response(backbone, tmp_path):
    img = _image(tmp_path)
    source = _write(tmp_path / "turns.jsonl", [{
        "images": [img],
        "prompt": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And the shape?"},
        ],
        "chosen": [{"role": "assistant", "content": "circle"}],
        "rejected": [{"role": "assistant", "content": "square"}],
    }])  # fmt: skip
    batch = _first(_dm(backbone.processor, source))
    tok = backbone.tokenizer
    labelled = [tok.decode(batch["input_ids"][i][batch["labels_mask"][i]]) for i in range(2)]
    assert labelled == ["circle<|im_end|>", "square<|im_end|>"]  # not the prompt's earlier "red"


_GOOD_REPLY = [{"role": "assistant", "content": "red"}]


@pytest.mark.parametrize(
    "row, fixed, message",
    [
        (
            {"question": "<image> and <image>?"},
            {"question": "<image> what?"},
            "row 0: field 'prompt' has 2 <image> marker",
        ),
        (
            {"chosen": [{"role": "user", "content": "hi"}]},
            {"chosen": _GOOD_REPLY},
            "row 0: field 'chosen': the last message",
        ),
        (
            {
                "rejected": [
                    {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}
                ]
            },
            {"rejected": [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]},
            "row 0: field 'rejected': images belong in the prompt",
        ),
        ({"margin": "big"}, None, "row 0: field 'margin': expected a number"),
        ({"chosen": []}, {"chosen": _GOOD_REPLY}, "row 0: field 'chosen': expected a non-empty list"),
    ],
    ids=["markers", "chosen-role", "image-in-response", "margin", "empty"],
)
def test_bad_rows_are_named(row, fixed, message, backbone, tmp_path):
    good = {"image": _image(tmp_path), "question": "What?", "chosen": "red", "rejected": "blue"}
    columns = {"images": "image", "prompt": "question"}
    source = _write(tmp_path / "bad.jsonl", [{**good, **row}])
    with pytest.raises(BadRowError, match=message):
        _dm(backbone.processor, source, columns=columns)
    # skipped and counted; the good row (same column types, as Arrow needs) is kept
    if fixed is None:  # Arrow cannot hold a string and a number in one column
        return
    both = _write(tmp_path / "both.jsonl", [{**good, **row}, {**good, **fixed}])
    dm = _dm(backbone.processor, both, columns=columns, bad_rows="skip")
    assert len(dm.datasets["train"]) == 1 and dm.skipped[str(both)] == {"bad": 1}


def test_missing_column_names_the_mapping(backbone, tmp_path):
    source = _write(
        tmp_path / "r.jsonl", [{"image": _image(tmp_path), "question": "q", "chosen": "a", "rejected": "b"}]
    )
    with pytest.raises(KeyError, match="missing column 'prompt' .*map it with data.columns"):
        _dm(backbone.processor, source, columns={"images": "image"})


def test_synthetic_pairs_prefer_the_correct_answer(synthetic_dir):
    rows = [json.loads(line) for line in (synthetic_dir / "pref_val.jsonl").read_text().splitlines()]
    assert rows and all(r["chosen"][0]["content"][0]["text"] == r["answer"] for r in rows)
    assert all(r["rejected"][0]["content"][0]["text"] != r["answer"] for r in rows)


# ---------------------------------------------------------------- vision once
def _count_tower(backbone: VLMBackbone) -> list[int]:
    """Patches fed to the vision tower, one entry per call."""
    seen: list[int] = []
    backbone.vision_tower.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("vision", ["frozen", "train"])
def test_vision_tower_runs_once_per_pair(vision, synthetic_dir):
    """Per training step: frozen tower -> one call shared by chosen, rejected and the reference;
    trained tower -> one policy call and one reference call. Each call sees the B prompts' images
    once; encoding per sequence (vision_once: false) feeds twice the patches to each call."""
    module = DPO(BackboneConfig(tiny=TinyVLM(), vision=vision), lr=1e-3)
    module.configure_model()
    calls = _count_tower(module.backbone)
    ref_calls = _count_tower_ref(module)
    _fit(module, synthetic_dir, steps=1, limit_val_batches=0)
    per_call = calls[0]
    assert len(calls) + len(ref_calls) == (1 if vision == "frozen" else 2)
    assert all(c == per_call for c in calls + ref_calls)

    baseline = DPO(BackboneConfig(tiny=TinyVLM(), vision=vision), lr=1e-3)
    baseline.configure_model()
    b_calls, b_ref = _count_tower(baseline.backbone), _count_tower_ref(baseline)
    dm = PreferenceDataModule(train=str(synthetic_dir / "pref_train.jsonl"), batch_size=4, vision_once=False)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False).fit(baseline, dm)  # fmt: skip
    assert len(b_calls) + len(b_ref) == 2 and b_calls[0] == 2 * per_call


def _count_tower_ref(module) -> list[int]:
    ref = module.backbone._reference
    seen: list[int] = []
    VLMBackbone._vision_of(ref).register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen


def test_pairs_without_images(backbone, tmp_path):
    """Text-only pairs (the processor still returns mm_token_type_ids) take the plain path."""
    source = _write(tmp_path / "text.jsonl", [
        {"images": [], "prompt": "Say a colour.", "chosen": "red", "rejected": "blue"},
        {"images": [], "prompt": "Say a shape.", "chosen": "circle", "rejected": "square"},
    ])  # fmt: skip
    module = DPO(BackboneConfig(tiny=TinyVLM()))
    module.configure_model()
    dm = _dm(module.backbone.processor, source, batch_size=2)
    batch = _first(dm)
    assert "pixel_values" not in batch["vision"]
    loss, metrics = module._loss(batch)
    assert torch.isfinite(loss) and metrics["rewards/accuracies"].item() == 0.0  # policy == reference
    loss.backward()


def test_vision_once_gives_the_same_loss_and_gradients(synthetic_dir):
    torch.manual_seed(0)
    module = DPO(BackboneConfig(tiny=TinyVLM(), vision="train"))
    module.configure_model()
    results = []
    for once in (True, False):
        dm = _dm(module.backbone.processor, synthetic_dir / "pref_train.jsonl", vision_once=once)
        loss, metrics = module._loss(_first(dm))
        grads = torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad])
        results.append((loss, metrics, grads))
    (l1, m1, g1), (l2, m2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-6)
    assert torch.allclose(m1["logps/chosen"], m2["logps/chosen"], atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g2, strict=True))


# ---------------------------------------------------------------- training
def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("cls", [DPO, MPO, RewardModel])
@pytest.mark.parametrize("lora", [None, LoraSettings(r=4)], ids=["full", "lora"])
def test_trainable_weights_move_frozen_and_reference_stay(cls, lora, family, synthetic_dir):
    torch.manual_seed(0)
    module = cls(BackboneConfig(tiny=TinyVLM(family=family), lora=lora), lr=1e-3)
    module.configure_model()
    before = _snapshot(module)
    ref = module.backbone._reference
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()} if ref is not None else {}
    assert (ref is not None) == (cls is not RewardModel and lora is None)
    _fit(module, synthetic_dir, steps=2)
    for name, p in module.named_parameters():
        assert (not torch.equal(before[name], p)) == p.requires_grad, name
    assert all(torch.equal(p, ref_before[n]) for n, p in (ref.named_parameters() if ref is not None else []))
    if lora is not None and cls is not RewardModel:  # the reference is the base: adapters off
        batch = _first(_dm(module.backbone.processor, synthetic_dir / "pref_train.jsonl"))
        fresh = cls(BackboneConfig(tiny=TinyVLM(family=family)))
        fresh.configure_model()
        with torch.no_grad():
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(
                module.pairs.reference(batch), fresh.pairs.policy(batch)[0], strict=True))  # fmt: skip


def test_precomputed_reference_logps_equal_the_live_ones(synthetic_dir):
    torch.manual_seed(0)
    live = DPO(BackboneConfig(tiny=TinyVLM()), lr=1e-3)
    torch.manual_seed(0)
    cached = DPO(BackboneConfig(tiny=TinyVLM()), lr=1e-3, precompute_ref_logps=True)
    _fit(live, synthetic_dir, steps=2)
    trainer = _fit(cached, synthetic_dir, steps=2)
    assert set(cached.pairs.cache) == {"train", "val"}
    assert len(cached.pairs.cache["train"]) == len(trainer.datamodule.datasets["train"])
    assert cached.backbone._reference is None  # released: training needed no reference forward
    batch = _first(_dm(live.backbone.processor, synthetic_dir / "pref_train.jsonl"))
    want = live.pairs.reference(batch)  # the live reference (still the initial weights)
    got = cached.pairs.reference(batch)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got, strict=True))
    trained = {n: p for n, p in live.named_parameters()}
    assert all(torch.allclose(p, trained[n], atol=1e-5) for n, p in cached.named_parameters())
    assert cached.pairs.sources["train"].endswith("pref_train.jsonl (48 rows)")
    batch["rows"] = [10_000]  # not cached, and no reference left to score it
    with pytest.raises(RuntimeError, match=r"split 'train': rows \[10000\] have no precomputed .* released"):
        cached.pairs.reference(batch)


def test_label_smoothing_is_for_the_sigmoid_loss_only():
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type 'sigmoid' only"):
        DPO(BackboneConfig(tiny=TinyVLM()), loss_type="ipo", label_smoothing=0.1)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_dpo_variants_train(loss_type, synthetic_dir):
    module = DPO(BackboneConfig(tiny=TinyVLM()), loss_type=loss_type, lr=1e-3)
    trainer = _fit(module, synthetic_dir, steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    batch = _first(_dm(module.backbone.processor, synthetic_dir / "pref_train.jsonl"))
    with torch.no_grad():
        (c, r), logps, _ = module.pairs.policy(batch)
        loss, _ = module._loss(batch)
    mask = batch["labels_mask"]
    sums = logps.sum(-1)
    want = sums / mask.sum(-1) if loss_type == "ipo" else sums  # IPO: token means, as in its paper
    assert torch.allclose(torch.cat([c, r]), want, atol=1e-5)
    rc, rr = module.pairs.reference(batch)
    gap = (c - rc) - (r - rr)
    expected = ((gap - 1 / (2 * 0.1)) ** 2).mean() if loss_type == "ipo" else torch.relu(1 - 0.1 * gap).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


# ---------------------------------------------------------------- MPO delta
def test_mpo_delta_is_the_running_mean_of_step_rewards(synthetic_dir):
    seen: list[float] = []
    deltas: list[float] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/rewards/batch_mean"]))
            deltas.append(module.delta)

    module = MPO(BackboneConfig(tiny=TinyVLM()), lr=1e-3)
    _fit(module, synthetic_dir, steps=3, callbacks=[Spy()], accumulate_grad_batches=2, limit_val_batches=0)
    steps = [(seen[0] + seen[1]) / 2, (seen[2] + seen[3]) / 2, (seen[4] + seen[5]) / 2]
    assert module.delta_count == 3
    assert deltas[0] == 0.0  # mid-step: not updated until the step's last micro-batch
    assert abs(deltas[1] - steps[0]) < 1e-6 and abs(deltas[3] - sum(steps[:2]) / 2) < 1e-6
    assert abs(module.delta - sum(steps) / 3) < 1e-6 and module.delta != 0.0


def test_mpo_weights_select_terms(synthetic_dir):
    batch = None
    for weights, active in (((1.0, 0.0, 0.0), "preference"), ((0.0, 0.0, 1.0), "generation")):
        torch.manual_seed(0)
        module = MPO(BackboneConfig(tiny=TinyVLM()), preference_weight=weights[0], quality_weight=weights[1],
                     generation_weight=weights[2])  # fmt: skip
        module.configure_model()
        batch = batch or _first(_dm(module.backbone.processor, synthetic_dir / "pref_train.jsonl"))
        loss, metrics = module._loss(batch)
        assert torch.allclose(loss, metrics[f"loss/{active}"])
        assert all(metrics[f"loss/{t}"] == 0 for t in ("preference", "quality", "generation") if t != active)
    with pytest.raises(ValueError, match="at least one of the MPO weights"):
        MPO(BackboneConfig(tiny=TinyVLM()), preference_weight=0, quality_weight=0, generation_weight=0)


# ---------------------------------------------------------------- reward model
def test_reward_model_export_loads_as_a_scorer(synthetic_dir, tmp_path):
    from lightning_vlm.callbacks import ExportHF

    torch.manual_seed(0)
    module = RewardModel(BackboneConfig(tiny=TinyVLM(), lora=LoraSettings(r=4)), lr=1e-3)
    _fit(module, synthetic_dir, steps=2, callbacks=[ExportHF(str(tmp_path / "rm"))], limit_val_batches=0)
    loaded = RewardModel.from_pretrained(str(tmp_path / "rm"))
    batch = _first(_dm(loaded.backbone.processor, synthetic_dir / "pref_val.jsonl"))
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["copies"])
    module.eval()
    with torch.no_grad():
        assert torch.allclose(module.scores(*args), loaded.scores(*args), atol=1e-5)
        fresh = RewardModel(BackboneConfig(tiny=TinyVLM()))
        fresh.configure_model()
        assert not torch.allclose(fresh.scores(*args), loaded.scores(*args), atol=1e-3)
    with pytest.raises(FileNotFoundError, match="not a reward model export"):
        RewardModel.from_pretrained(str(module.backbone.path))


def test_reward_model_reads_the_last_real_token_and_uses_margins(synthetic_dir, tmp_path):
    torch.manual_seed(0)
    module = RewardModel(BackboneConfig(tiny=TinyVLM()))
    module.configure_model()
    batch = _first(_dm(module.backbone.processor, synthetic_dir / "pref_train.jsonl"))
    with torch.no_grad():
        s = module.scores(batch["input_ids"], batch["attention_mask"], batch["vision"], batch["copies"])
        hidden = module.backbone.hidden_states(
            batch["input_ids"], batch["attention_mask"], batch["vision"], copies=2
        )
        assert torch.allclose(s, module.head(hidden[:, -1]).squeeze(-1), atol=1e-6)  # left padding
        plain, _ = module._loss(batch)
        batch["margin"] = [3.0] * len(batch["rows"])
        with_margin, _ = module._loss(batch)
    assert with_margin > plain


# ---------------------------------------------------------------- the tiny recipes, from the CLI
ROOT = Path(__file__).resolve().parents[1]


def _recipe_args(objective: str, tmp_path: Path, synthetic_dir: Path, *extra: str) -> list[str]:
    """The offline tiny recipe on the test's data, starting from a tiny model (the SFT export's stand-in)."""
    import yaml

    from lightning_vlm.tiny import ensure_tiny_vlm

    tmp_path.mkdir(parents=True, exist_ok=True)
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning_vlm.callbacks.ExportHF", "init_args": {"dirpath": str(tmp_path / "hf")}},
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
    from lightning_vlm.tiny import ensure_tiny_vlm

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


def test_predict_rows(synthetic_dir):
    torch.manual_seed(0)
    dpo = DPO(BackboneConfig(tiny=TinyVLM()), beta=0.5)
    dpo.configure_model()
    batch = _first(_dm(dpo.backbone.processor, synthetic_dir / "pref_val.jsonl"))
    with torch.no_grad():
        rows = dpo.predict_step(batch, 0)
    assert [r["row"] for r in rows] == batch["rows"]
    assert all(r["reward_chosen"] == 0.0 and r["reward_rejected"] == 0.0 for r in rows)  # policy == reference
    with torch.no_grad():
        for p in dpo.trainable_named_parameters().values():  # the frozen tower stays as it is
            p.add_(0.01 * torch.randn_like(p))
        (c, r), _, _ = dpo.pairs.policy(batch)
        rc, rr = dpo.pairs.reference(batch)
        rows = dpo.predict_step(batch, 0)
    assert [x["reward_chosen"] for x in rows] == pytest.approx((0.5 * (c - rc)).tolist(), abs=1e-6)
    assert any(x["reward_rejected"] != 0.0 for x in rows)

    rm = RewardModel(BackboneConfig(tiny=TinyVLM()))
    rm.configure_model()
    with torch.no_grad():
        rows = rm.predict_step(batch, 0)
        s = rm.scores(batch["input_ids"], batch["attention_mask"], batch["vision"], batch["copies"])
    n = len(batch["rows"])
    assert [x["score_chosen"] for x in rows] == pytest.approx(s[:n].tolist(), abs=1e-6)
    assert [x["score_rejected"] for x in rows] == pytest.approx(s[n:].tolist(), abs=1e-6)
