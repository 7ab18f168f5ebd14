"""Data sources as people have them: a hub snapshot folder (README + data/train-*.parquet), shards named
by a glob, a ``data_files`` dict, a config name, split slices, saved splits; JSON lines read through
``datasets``' builder, and rows whose types vary read back exactly as written."""

from __future__ import annotations

import re

import datasets
import pytest

from lightning_vlm.data import PromptDataModule
from tests.helpers.sft_data import assistant, datamodule, draw, one_batch, user, write_jsonl


def rows(folder, n: int, tag: str = "r") -> list[dict]:
    """``n`` SFT rows whose replies are ``{tag}0``, ``{tag}1``, ..., with an image under ``folder/img``."""
    name = draw(folder / "img" / "a.png", (64, 64), (220, 30, 30))
    return [{"images": [name], "messages": [user("Colour?", 1), assistant(f"{tag}{i}")]} for i in range(n)]


def replies(dm, split: str = "train") -> list[str]:
    return [r["messages"][-1]["content"][0]["text"] for r in dm.datasets[split]]


def write_parquet(path, items: list[dict], embed: bool = False) -> None:
    """Rows as a Parquet file; with ``embed`` the images are stored as bytes (``datasets.Image``), as on
    the hub."""
    ds = datasets.Dataset.from_list(items)
    if embed:  # paths are relative to the data folder; the hub stores the bytes themselves
        ds = ds.map(lambda r: {"images": [str(path.parents[1] / p) for p in r["images"]]})
        ds = ds.cast_column("images", datasets.List(datasets.Image()))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


@pytest.fixture
def snapshot(tmp_path):
    """A hub snapshot as ``huggingface-cli download`` leaves it: README.md and data/<split>-*.parquet."""
    root = tmp_path / "snapshot"
    good = rows(root, 5)
    (root / "README.md").write_text("---\nlicense: mit\n---\n# A dataset\n")
    write_parquet(root / "data" / "train-00000-of-00002.parquet", good[:2], embed=True)
    write_parquet(root / "data" / "train-00001-of-00002.parquet", good[2:4], embed=True)
    write_parquet(root / "data" / "test-00000-of-00001.parquet", good[4:], embed=True)
    return root


def test_a_hub_snapshot_folder_loads_its_splits(processor, snapshot):
    dm = datamodule(processor, str(snapshot), val=f"{snapshot}:test", batch_size=4)
    assert replies(dm) == ["r0", "r1", "r2", "r3"] and replies(dm, "val") == ["r4"]
    batch = one_batch(dm)
    assert batch["vision"]["image_grid_thw"].shape[0] == 4  # images stored as bytes decode
    assert len(datamodule(processor, f"{snapshot}:train[1:3]").datasets["train"]) == 2


def test_a_folder_with_configs_loads_the_named_one(processor, tmp_path):
    root = tmp_path / "configs"
    for config in ("colour", "shape"):
        write_parquet(root / config / "train.parquet", rows(root, 3, tag=config))
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: colour\n  data_files:\n  - split: train\n    path: colour/*.parquet\n"
        "- config_name: shape\n  data_files:\n  - split: train\n    path: shape/*.parquet\n---\n"
    )
    assert replies(datamodule(processor, f"{root}:shape:train")) == ["shape0", "shape1", "shape2"]
    assert replies(datamodule(processor, f"{root}:colour:train[-1:]")) == ["colour2"]


def test_a_glob_loads_every_shard_and_finds_their_images(processor, tmp_path):
    good = rows(tmp_path, 4)
    write_jsonl(tmp_path / "part-0.jsonl", good[:2])
    write_jsonl(tmp_path / "part-1.jsonl", good[2:])
    dm = datamodule(processor, f"{tmp_path}/part-*.jsonl", batch_size=4)
    assert replies(dm) == ["r0", "r1", "r2", "r3"]
    assert one_batch(dm)["vision"]["image_grid_thw"].shape[0] == 4
    with pytest.raises(FileNotFoundError, match=r"no files match .*/nothing-\*\.jsonl"):
        datamodule(processor, f"{tmp_path}/nothing-*.jsonl")


def test_a_data_files_dict_picks_its_split(processor, tmp_path):
    good = rows(tmp_path, 3)
    write_jsonl(tmp_path / "a.jsonl", good[:2])
    write_jsonl(tmp_path / "b.jsonl", good[2:])
    files = {"train": str(tmp_path / "a.jsonl"), "validation": str(tmp_path / "b.jsonl")}
    dm = datamodule(
        processor,
        {"path": "json", "data_files": files},
        val={"path": "json", "data_files": files, "split": "validation"},
    )
    assert replies(dm) == ["r0", "r1"] and replies(dm, "val") == ["r2"]
    assert one_batch(dm, "val")["answers"] == ["r2"]  # images resolve against the data files' folder
    with pytest.raises(ValueError, match=r"keys are path, name, .*not \['splits'\]"):
        datamodule(processor, {"path": "json", "data_files": files, "splits": "train"})


def test_split_slices_of_a_file_and_of_a_saved_dataset_dict(processor, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows(tmp_path, 4))
    assert replies(datamodule(processor, f"{path}:train[:2]")) == ["r0", "r1"]
    assert replies(datamodule(processor, f"{path}:train[50%:]")) == ["r2", "r3"]
    saved = tmp_path / "saved"
    splits = {"train": rows(tmp_path, 3), "test": rows(tmp_path, 2, tag="t")}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(saved)
    for image in ("img",):  # a saved folder resolves relative images against itself
        (saved / image).mkdir()
        (saved / image / "a.png").write_bytes((tmp_path / "img" / "a.png").read_bytes())
    assert replies(datamodule(processor, f"{saved}:test")) == ["t0", "t1"]
    assert replies(datamodule(processor, f"{saved}:train[1:]")) == ["r1", "r2"]
    assert replies(datamodule(processor, str(saved))) == ["r0", "r1", "r2"]  # no split means train
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(saved))}:val: holds the splits \['train', 'test'\]"
    ):
        datamodule(processor, f"{saved}:val")


def test_source_strings_name_config_split_and_slice():
    from lightning_vlm.data.sources import parse_source

    assert parse_source("user/set") == {"path": "user/set"}
    assert parse_source("user/set:test") == {"path": "user/set", "split": "test"}
    assert parse_source("user/set:cfg:train[:10%]") == {
        "path": "user/set",
        "name": "cfg",
        "split": "train[:10%]",
    }
    assert parse_source("data/x.jsonl:train[10:20]") == {"path": "data/x.jsonl", "split": "train[10:20]"}


def test_json_lines_are_read_by_the_datasets_builder(processor, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows(tmp_path, 3))
    ds = datamodule(processor, path).datasets["train"]
    # memory-mapped from datasets' cache, not a table built in memory by hand
    assert ds.cache_files and all(f["filename"].endswith(".arrow") for f in ds.cache_files)


def test_values_whose_types_vary_read_back_as_written(processor, tmp_path):
    name = draw(tmp_path / "img" / "a.png", (64, 64), (220, 30, 30))
    answers = ["2", 3, "null", None, "[1]", 2.5]  # strings that look like JSON stay strings
    items = [{"images": [name], "prompt": "<image>How many?", "answer": a} for a in answers]
    path = write_jsonl(tmp_path / "p.jsonl", items)
    assert prompt_answers(processor, path) == answers
    assert [type(a) for a in prompt_answers(processor, path)] == [type(a) for a in answers]
    assert prompt_answers(processor, f"{path}:train[1:3]") == [3, "null"]  # sliced like any other


def prompt_answers(processor, source: str) -> list:
    dm = PromptDataModule(train=source)
    dm.processor = processor
    dm.setup("fit")
    return dm.datasets["train"]["answer"]
