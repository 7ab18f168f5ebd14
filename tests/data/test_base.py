"""The datamodule base: the processor comes from the trainer's backbone, images stored as bytes
(save_to_disk, parquet, the datasets Image feature) collate like image paths, and row checks are cached
by the data's fingerprint and what the checks depend on."""

from __future__ import annotations

import copy
import io

import datasets
import lightning as L
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lightning_vlm.data import SFTDataModule
from tests.helpers.sft_data import assistant, datamodule, draw, one_batch, user, write_jsonl

# ---------------------------------------------------------------------- the processor hand-off


class Recorder(L.LightningModule):
    def __init__(self, backbone=None):
        super().__init__()
        if backbone is not None:
            self.backbone = backbone
        self.seen: list[list[int]] = []

    def validation_step(self, batch, batch_idx):
        self.seen.append(list(batch["rows"]))


def quiet_trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture
def small_file(tmp_path):
    name = draw(tmp_path / "img" / "a.png", (64, 64), (220, 30, 30))
    rows = [{"images": [name], "messages": [user("What colour is the shape?", 1), assistant("red")]}] * 3
    return write_jsonl(tmp_path / "s.jsonl", rows)


def test_processor_comes_from_the_trainers_backbone(backbone, small_file):
    dm = SFTDataModule(train=small_file, val=small_file, batch_size=2)
    assert dm.processor is None
    module = Recorder(backbone)
    quiet_trainer().validate(module, datamodule=dm)
    assert dm.processor is backbone.processor
    assert module.seen == [[0, 1], [2]]


def test_no_processor_and_no_trainer_is_a_clear_error(small_file):
    dm = SFTDataModule(train=small_file, val=small_file)
    with pytest.raises(RuntimeError, match="needs a processor"):
        dm.setup("fit")
    assert dm.datasets == {}


def test_trainer_module_without_backbone_is_a_clear_error(small_file):
    dm = SFTDataModule(train=small_file, val=small_file)
    with pytest.raises(RuntimeError, match="needs a processor"):
        quiet_trainer().validate(Recorder(), datamodule=dm)


# ---------------------------------------------------------------------- images as bytes


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("form", ["save_to_disk", "parquet", "image_feature"])
def test_images_as_bytes_collate_like_paths(processor, tmp_path, form):
    img = tmp_path / "img"
    names = [
        draw(img / "a.png", (64, 64), (220, 30, 30)),
        draw(img / "b.png", (112, 80), (30, 70, 220)),
        draw(img / "c.png", (80, 96), (30, 160, 50)),
    ]
    layout = [
        ([0], [user("What colour is the shape?", 1), assistant("red")]),
        ([1, 2], [user("Which image shows the green shape?", 2), assistant("second")]),
        ([2], [user("How many?"), assistant("1"), user("What colour?", 1), assistant("green")]),
    ]
    path_rows = [{"images": [names[i] for i in idx], "messages": m} for idx, m in layout]
    reference = write_jsonl(tmp_path / "paths.jsonl", path_rows)
    pictures = [Image.open(tmp_path / n).convert("RGB") for n in names]
    if form == "image_feature":  # datasets' Image feature: rows come back as PIL images
        byte_rows = [{"images": [pictures[i] for i in idx], "messages": m} for idx, m in layout]
    else:
        byte_rows = [
            {"images": [{"bytes": png_bytes(pictures[i]), "path": None} for i in idx], "messages": m}
            for idx, m in layout
        ]
    ds = datasets.Dataset.from_list(byte_rows)
    if form == "parquet":
        source = str(tmp_path / "bytes.parquet")
        ds.to_parquet(source)
    else:
        source = str(tmp_path / "bytes_dataset")
        ds.save_to_disk(source)
    n = len(layout)
    want = one_batch(datamodule(processor, reference, val=reference, eval_batch_size=n), "val")
    got = one_batch(datamodule(processor, source, val=source, eval_batch_size=n), "val")
    assert got["rows"] == want["rows"] == [0, 1, 2]
    for key in ("input_ids", "attention_mask", "labels_mask"):
        assert torch.equal(got[key], want[key]), key
    assert set(got["vision"]) == set(want["vision"])
    for key in want["vision"]:
        assert torch.equal(got["vision"][key], want["vision"][key]), key
    assert torch.equal(got["prompt"]["input_ids"], want["prompt"]["input_ids"])
    assert got["answers"] == ["red", "second", "green"]
    assert got["vision"]["image_grid_thw"].shape[0] == 4


class _Slow(torch.utils.data.Dataset):
    """Rows a worker takes 30 s to deliver, like a deadlocked one."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        import time

        time.sleep(30)
        return i


def test_loaders_spawn_their_workers_and_a_stuck_worker_fails_naming_the_rank(small_file):
    """Workers start with spawn (a fork of a threaded process can deadlock), and a worker that delivers
    nothing within data.worker_timeout stops the run with an error naming the rank and the knob."""
    from lightning_vlm.data.base import WorkerLoader

    dm = SFTDataModule(train=str(small_file), batch_size=2, num_workers=1, worker_timeout=3)
    dm.datasets["train"] = _Slow()
    loader = dm._loader("train", torch.utils.data.default_collate, shuffle=False)
    assert isinstance(loader, WorkerLoader) and loader.multiprocessing_context.get_start_method() == "spawn"
    with pytest.raises(RuntimeError, match=r"rank 0: a DataLoader worker delivered no batch in 3 s \(data.worker_timeout\)"):
        next(iter(loader))
    import multiprocessing

    assert not multiprocessing.active_children()  # the stuck worker is gone, not left to die later
    plain = SFTDataModule(train=str(small_file), batch_size=2)  # no workers: nothing to spawn or time out
    plain.datasets["train"] = [0, 1]
    inline = plain._loader("train", torch.utils.data.default_collate, shuffle=False)
    assert inline.multiprocessing_context is None and inline.timeout == 0
    assert torch.equal(next(iter(inline)), torch.tensor([0, 1]))


# ---------------------------------------------------------------------- cached row checks


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The rows that SFTDataModule's row check runs on."""
    seen: list[int] = []
    check = SFTDataModule._check_row

    def counted(self, row):
        seen.append(row["__row"])
        return check(self, row)

    monkeypatch.setattr(SFTDataModule, "_check_row", counted)
    return seen


@pytest.fixture
def replies_file(tmp_path):
    name = draw(tmp_path / "img" / "a.png", (64, 64), (220, 30, 30))
    rows = [
        {"images": [name], "messages": [user("Colour?", 1), assistant("red " * (i + 1))]} for i in range(4)
    ]
    return write_jsonl(tmp_path / "t.jsonl", rows)


def test_row_checks_are_cached_and_the_policy_applies_to_the_cached_lengths(
    processor, replies_file, calls, monkeypatch, tmp_path
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_VLM_CACHE", str(cache))
    datamodule(processor, replies_file)
    assert sorted(calls) == [0, 1, 2, 3]
    calls.clear()
    again = datamodule(processor, replies_file)
    assert calls == [] and again.datasets["train"]["__row"] == [0, 1, 2, 3]  # read from the cache
    (stored,) = (cache / "row_checks").glob("*.parquet")
    lengths = pq.read_table(stored)["__len"].to_pylist()
    assert len(set(lengths)) == 4  # the fixture's rows differ in length
    limit = sorted(lengths)[1]
    # max_length is applied to the cached lengths: nothing is checked again, and the same rows are kept
    # as a fresh check keeps
    cached = datamodule(processor, replies_file, max_length=limit, overlong="drop")
    assert calls == []
    monkeypatch.setenv("LIGHTNING_VLM_CACHE", str(tmp_path / "fresh"))
    fresh = datamodule(processor, replies_file, max_length=limit, overlong="drop")
    assert len(calls) == 4
    kept = [i for i, n in enumerate(lengths) if n <= limit]
    assert cached.datasets["train"]["__row"] == fresh.datasets["train"]["__row"] == kept
    assert cached.skipped == fresh.skipped == {replies_file: {"overlong": 2}}


def test_row_checks_run_again_when_what_they_depend_on_changes(processor, replies_file, calls):
    datamodule(processor, replies_file)
    calls.clear()
    datamodule(processor, replies_file, max_length=100, overlong="drop", bad_rows="skip")
    assert calls == []  # the policy is not what the results depend on
    datamodule(processor, replies_file, check_images=False)  # the check's settings
    assert len(calls) == 4
    calls.clear()
    other = copy.deepcopy(processor)  # the processor's settings
    other.image_processor.size.longest_edge = 28 * 28 * 4  # a smaller max_pixels
    datamodule(other, replies_file)
    assert len(calls) == 4
    calls.clear()
    with open(replies_file, "a") as f:  # the data
        f.write(open(replies_file).readline())
    datamodule(processor, replies_file)
    assert len(calls) == 5


def test_a_cached_bad_row_is_checked_again(processor, tmp_path, calls):
    good = draw(tmp_path / "img" / "a.png", (64, 64), (220, 30, 30))
    rows = [
        {"images": [name], "messages": [user("Colour?", 1), assistant("red")]} for name in (good, "img/b.png")
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert datamodule(processor, path, bad_rows="skip").skipped[path] == {"bad": 1}
    calls.clear()
    draw(tmp_path / "img" / "b.png", (64, 64), (30, 30, 220))  # the missing image is added
    dm = datamodule(processor, path, bad_rows="skip")
    assert calls == [1] and dm.skipped[path] == {} and dm.datasets["train"]["__row"] == [0, 1]
