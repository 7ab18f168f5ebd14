"""Streamed splits: rows checked as they arrive (bad rows skipped and counted, or an error naming the row),
each rank its own disjoint share, a resumed epoch passing over the batches already used, workers
included; data that cannot stream says so."""

from __future__ import annotations

import re
from types import SimpleNamespace

import lightning as L
import pytest

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from lightning_vlm.data.rows import BadRowError
from tests.helpers.sft_data import END, assistant, draw, user, write_jsonl

BAD = (3, 7)  # rows whose image is missing


def rows(folder, n: int, bad: tuple[int, ...] = ()) -> list[dict]:
    name = draw(folder / "img" / "a.png", (64, 64), (220, 30, 30))
    return [
        {
            "images": ["img/none.png" if i in bad else name],
            "messages": [user("Colour?", 1), assistant(f"r{i}")],
        }
        for i in range(n)
    ]


def streamed(processor, files: str, world: int = 1, rank: int = 0, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(train={"path": files, "streaming": True}, **kwargs)
    dm.processor = processor
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)  # what the loaders read of it
    dm.setup("fit")
    return dm


def replies(processor, batches: list[dict]) -> list[str]:
    """The reply of each row, in the order the loader gave them."""
    tok = processor.tokenizer
    return [
        tok.decode(b["input_ids"][k][b["labels_mask"][k]]).removesuffix(END)
        for b in batches
        for k in range(len(b["rows"]))
    ]


def test_bad_rows_are_skipped_and_counted_as_they_stream(processor, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows(tmp_path, 10, BAD))
    dm = streamed(processor, path, bad_rows="skip", batch_size=4)
    source = f"path={path}, streaming=True"
    assert dm.skipped[source] == {}  # nothing is read at set-up
    batches = list(dm.train_dataloader())
    assert replies(processor, batches) == [f"r{i}" for i in range(10) if i not in BAD]
    assert [len(b["rows"]) for b in batches] == [3, 3, 2]  # a batch is short by its bad rows
    assert dm.skipped[source] == {"bad": 2}
    list(dm.train_dataloader())  # a second epoch counts on
    assert dm.skipped[source] == {"bad": 4}
    dm = streamed(processor, path, batch_size=4)  # bad_rows: error
    with pytest.raises(BadRowError, match=rf"^{re.escape(source)}: row 3: field 'images'.*none\.png"):
        list(dm.train_dataloader())


def test_overlong_rows_are_dropped_and_counted(processor, tmp_path):
    long = rows(tmp_path, 3)
    long[1]["messages"][-1] = assistant("word " * 200)
    path = write_jsonl(tmp_path / "t.jsonl", long)
    dm = streamed(processor, path, max_length=120, overlong="drop", batch_size=3)
    assert replies(processor, list(dm.train_dataloader())) == ["r0", "r2"]
    assert dm.skipped[f"path={path}, streaming=True"] == {"overlong": 1}


@pytest.mark.parametrize("shards", [1, 2], ids=["one-file", "two-files"])
def test_two_ranks_get_disjoint_rows(processor, tmp_path, shards):
    good = rows(tmp_path, 10)
    for k in range(shards):
        write_jsonl(tmp_path / f"part-{k}.jsonl", good[k::shards])
    seen = [
        replies(processor, list(streamed(processor, f"{tmp_path}/part-*.jsonl", 2, rank).train_dataloader()))
        for rank in (0, 1)
    ]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"r{i}" for i in range(10))
    assert min(len(s) for s in seen) >= 4  # each rank its share, not one rank all


def test_a_resumed_epoch_passes_over_the_batches_used(processor, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows(tmp_path, 10, BAD))
    dm = streamed(processor, path, bad_rows="skip", batch_size=2)
    dm.load_state_dict({"resume": {"epoch": 0, "rows": 4}})  # raw batches [0, 1] and [2, 3] were used
    loader = dm.train_dataloader()
    assert replies(processor, list(loader)) == ["r4", "r5", "r6", "r8", "r9"]
    assert replies(processor, list(loader)) == [f"r{i}" for i in range(10) if i not in BAD]  # next epoch


def test_workers_share_the_stream_count_its_skips_and_resume(processor, tmp_path):
    good = rows(tmp_path, 8, bad=(1,))
    write_jsonl(tmp_path / "part-0.jsonl", good[:4])
    write_jsonl(tmp_path / "part-1.jsonl", good[4:])
    dm = streamed(processor, f"{tmp_path}/part-*.jsonl", bad_rows="skip", batch_size=2, num_workers=2)
    assert replies(processor, list(dm.train_dataloader())) == ["r0", "r4", "r5", "r2", "r3", "r6", "r7"]
    assert dm.skipped[f"path={tmp_path}/part-*.jsonl, streaming=True"] == {"bad": 1}
    dm.load_state_dict({"resume": {"epoch": 0, "rows": 6}})  # raw batches 0, 1 and 2 were used
    assert replies(processor, list(dm.train_dataloader())) == ["r6", "r7"]


def test_prompt_data_streams_and_preference_data_says_it_cannot(processor, tmp_path):
    name = draw(tmp_path / "img" / "a.png", (64, 64), (220, 30, 30))
    items = [{"images": [name], "prompt": "<image>Colour?", "answer": a} for a in ("red", "blue", "green")]
    path = write_jsonl(tmp_path / "p.jsonl", items)
    dm = PromptDataModule(train={"path": path, "streaming": True}, batch_size=2)
    dm.processor = processor
    dm.setup("fit")
    assert [a for b in dm.train_dataloader() for a in b["columns"]["answer"]] == ["red", "blue", "green"]
    pairs = [{"images": [name], "prompt": "<image>Colour?", "chosen": "red", "rejected": "blue"}]
    dm = PreferenceDataModule(train={"path": write_jsonl(tmp_path / "d.jsonl", pairs), "streaming": True})
    dm.processor = processor
    with pytest.raises(ValueError, match=r"streaming=True: PreferenceDataModule cannot stream its data"):
        dm.setup("fit")


class ResumeStates(L.Callback):
    """The datamodule's resume state after each training batch, as a checkpoint saved then would hold."""

    def __init__(self):
        self.states: list[dict] = []

    def on_train_batch_end(self, trainer, *args):
        self.states.append(trainer.datamodule.state_dict()["resume"])


def test_training_on_a_stream_records_the_raw_batches_for_resuming(tmp_path):
    from lightning_vlm.objectives import SFT

    path = write_jsonl(tmp_path / "t.jsonl", rows(tmp_path, 10, bad=(2, 3)))
    dm = SFTDataModule(train={"path": path, "streaming": True}, batch_size=2, bad_rows="skip")
    model = SFT(backbone=BackboneConfig(tiny=TinyVLM(hidden_size=64, num_layers=1)))
    states = ResumeStates()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[states],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    # raw batch [2, 3] held only bad rows: the second step's batch is the third raw batch
    assert states.states == [{"epoch": 0, "rows": 2}, {"epoch": 0, "rows": 6}]
    assert dm.skipped[f"path={path}, streaming=True"] == {"bad": 2}
