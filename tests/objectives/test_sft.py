"""SFT on rows beyond chat: TRL's prompt-completion rows, and a custom objective that reads the batch's
extra columns (a per-row weight) with no collator of its own."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.data import SFTDataModule
from lightning_vlm.objectives import SFT
from tests.helpers.sft_data import END, assistant, draw, user, write_jsonl


class WeightedSFT(SFT):
    """SFT whose rows weigh by their ``weight`` column: each row's token-mean NLL times its weight."""

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = batch["labels_mask"]  # (B, T)
        logps = self.backbone.token_logps(batch["input_ids"], batch["attention_mask"], batch["vision"], mask)
        weight = torch.tensor(batch["columns"]["weight"], dtype=logps.dtype, device=logps.device)  # (B,)
        per_row = -(logps * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        self.seen.append((list(batch["rows"]), batch["columns"]["weight"]))
        return (weight * per_row).mean(), {"tokens": mask.sum()}


def _fit(module, train: str, callbacks=()):
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))  # fmt: skip
    trainer.fit(module, SFTDataModule(train=train, batch_size=4))


def _rows(tmp_path) -> list[dict]:
    img = tmp_path / "img"
    return [
        {
            "images": [draw(img / f"{k}.png", (64, 64), colour)],
            "prompt": [user("Colour?", 1)],
            "completion": name,
        }
        for k, (colour, name) in enumerate((((220, 30, 30), "red"), ((30, 70, 220), "blue")))
    ] + [
        {
            "images": [],
            "prompt": [user("Say it."), assistant("green"), user("Again?")],
            "completion": [assistant("yes")],
        },
        {"images": [], "messages": [user("Say red."), assistant("red")]},  # a chat row in the same file
    ]


def test_weighted_sft_reads_the_weight_column(tmp_path):
    rows = [{**row, "weight": w} for row, w in zip(_rows(tmp_path), (0.0, 0.5, 1.0, 2.0), strict=True)]
    torch.manual_seed(0)
    module = WeightedSFT(BackboneConfig(tiny=TinyVLM()), lr=1e-3)
    module.seen = []
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.trainable_named_parameters().items()}
    _fit(module, write_jsonl(tmp_path / "w.jsonl", rows))
    ((ids, weights),) = module.seen
    assert sorted(ids) == [0, 1, 2, 3] and weights == [rows[i]["weight"] for i in ids]
    assert any(not torch.equal(before[n], p) for n, p in module.trainable_named_parameters().items())

    # All weights 0: the loss is 0 and nothing moves (the column is what the loss uses).
    module = WeightedSFT(BackboneConfig(tiny=TinyVLM()), lr=1e-3)
    module.seen = []
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.trainable_named_parameters().items()}
    _fit(module, write_jsonl(tmp_path / "z.jsonl", [{**row, "weight": 0.0} for row in rows]))
    assert all(torch.equal(before[n], p) for n, p in module.trainable_named_parameters().items())


def test_prompt_completion_rows_train_sft_on_the_completion_only(tmp_path):
    class Masks(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

    torch.manual_seed(0)
    module = SFT(BackboneConfig(tiny=TinyVLM()), lr=1e-3)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.trainable_named_parameters().items()}
    masks = Masks()
    _fit(module, write_jsonl(tmp_path / "pc.jsonl", _rows(tmp_path)), [masks])
    batch, tok = masks.batch, module.backbone.tokenizer
    labelled = [tok.decode(batch["input_ids"][k][batch["labels_mask"][k]]) for k in range(4)]
    want = ["red", "blue", "yes", "red"]
    assert labelled == [want[r] + END for r in batch["rows"]]  # no prompt token, not the prompt's "green"
    assert any(not torch.equal(before[n], p) for n, p in module.trainable_named_parameters().items())


def test_validation_writes_a_samples_table(tmp_path, synthetic_dir):
    from lightning.pytorch.loggers import WandbLogger

    from lightning_vlm.metrics import exact_match

    torch.manual_seed(0)
    module = SFT(BackboneConfig(tiny=TinyVLM()), eval_max_new_tokens=4, table_rows=5)
    val = synthetic_dir / "sft_val.jsonl"
    dm = SFTDataModule(
        train=str(synthetic_dir / "sft_train.jsonl"), val=str(val), batch_size=4, eval_batch_size=3
    )
    logger = WandbLogger(project="sft-table", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(max_steps=2, val_check_interval=1, limit_val_batches=3, accelerator="cpu", logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=1)  # fmt: skip
    trainer.fit(module, dm)
    import wandb

    wandb.finish()
    records = [json.loads(line) for line in (tmp_path / "val_samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["row"]) for r in records] == [
        (s, k) for s in (1, 2) for k in range(5)
    ]  # no sanity run
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    for rec in records:
        row = rows[rec["row"]]
        assert rec["prompt"] == row["messages"][-2]["content"][-1]["text"]
        assert rec["reference"] == row["messages"][-1]["content"][0]["text"]
        assert rec["accuracy"] == float(exact_match(rec["answer"], rec["reference"]))
        assert len(rec["images"]) == len(row["images"]) >= 1
        for path, ref in zip(rec["images"], row["images"], strict=True):
            saved = Image.open(path).convert("RGB")
            assert saved.tobytes() == Image.open(synthetic_dir / ref).convert("RGB").tobytes()
            assert Path(path).parent == tmp_path / "samples"
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/val/samples_*.table.json"))
    assert len(tables) == 2  # one per validation


def test_packing_is_refused_when_fit_starts_for_a_family_that_cannot_pack(tmp_path):
    module = SFT(BackboneConfig(tiny=TinyVLM(family="gemma3")))
    dm = SFTDataModule(train=write_jsonl(tmp_path / "t.jsonl", _rows(tmp_path)), packing=True, max_tokens=2048)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="data.packing: the gemma3 family cannot be packed: its image tokens"):
        trainer.fit(module, dm)
    assert module.backbone.model is None  # refused before the weights load
