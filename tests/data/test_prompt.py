"""Prompt data for online RL: batch layout, string prompts, public layouts, text-only rows, bad rows,
overlong prompts."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone
from lightning_vlm.data import PromptDataModule
from lightning_vlm.data.base import ResumableSampler
from lightning_vlm.data.prompt import PromptCollator
from lightning_vlm.data.rows import BadRowError

GEN_PROMPT = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def processor():
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM()))
    bb.load()
    return bb.processor


def _dm(processor, source, **kw) -> PromptDataModule:
    dm = PromptDataModule(train=str(source), batch_size=kw.pop("batch_size", 4), **kw)
    dm.processor = processor
    dm.setup("fit")
    return dm


def _first(dm) -> dict:
    return next(iter(dm._loader("train", dm._collator("train"), shuffle=False)))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _image(folder: Path, name: str, colour: str) -> str:
    Image.new("RGB", (56, 84), colour).save(folder / name)
    return name


def _user(*parts: str | None) -> list[dict]:
    """One user turn; ``None`` stands for an image part."""
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def _same(got: dict, want: dict) -> None:
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert got["vision"].keys() == want["vision"].keys()
    assert all(torch.equal(got["vision"][k], want["vision"][k]) for k in want["vision"])
    assert got["prompts"] == want["prompts"]


# ---------------------------------------------------------------- batch layout
def test_batch_is_left_padded_generation_prompts_with_columns(processor, synthetic_dir):
    source = synthetic_dir / "prompt_train.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()][:8]
    assert {r["task"] for r in rows} >= {"compare", "count"}  # one and two images: lengths differ
    batch = _first(_dm(processor, source, batch_size=8))
    assert batch["rows"] == list(range(8)) and batch["split"] == "train"
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "vision",
        "rows",
        "split",
        "prompts",
        "row_prompts",
        "images",
        "columns",
    }

    ids, am = batch["input_ids"], batch["attention_mask"]
    assert (am == 0).any(), "prompts of different lengths leave padding"
    tok, image_id = processor.tokenizer, processor.image_token_id
    grids = batch["vision"]["image_grid_thw"]
    assert grids.shape[0] == sum(len(r["images"]) for r in rows)
    assert batch["vision"]["mm_token_type_ids"].shape == ids.shape and "pixel_values" in batch["vision"]
    first_grid = 0
    for k, row in enumerate(rows):
        assert am[k].tolist() == sorted(am[k].tolist()), "padding is on the left"
        assert (ids[k][am[k] == 0] == tok.pad_token_id).all()
        question = row["prompt"][0]["content"][-1]["text"]
        assert tok.decode(ids[k][am[k].bool()]).endswith(question + GEN_PROMPT)
        # each row's image tokens are its own images' (the grids are in row order)
        n = len(row["images"])
        want = int(grids[first_grid : first_grid + n].prod(-1).sum()) // 4  # 2x2 merge
        assert int((ids[k] == image_id).sum()) == want
        first_grid += n

    assert batch["prompts"] == [r["prompt"] for r in rows]  # no Arrow None fields left in
    columns = batch["columns"]
    assert set(columns) == {"images", "answer", "task"}
    assert columns["answer"] == [r["answer"] for r in rows] and columns["task"] == [r["task"] for r in rows]
    assert columns["images"] is batch["images"]
    for row, opened in zip(rows, batch["images"], strict=True):
        assert len(opened) == len(row["images"])
        for ref, im in zip(row["images"], opened, strict=True):
            assert im.mode == "RGB"
            assert np.array_equal(np.asarray(im), np.asarray(Image.open(synthetic_dir / ref).convert("RGB")))


def test_loaders_shuffle_train_only(processor, synthetic_dir):
    dm = PromptDataModule(
        train=str(synthetic_dir / "prompt_train.jsonl"), val=str(synthetic_dir / "prompt_val.jsonl"),
        batch_size=4, eval_batch_size=16,
    )  # fmt: skip
    dm.processor = processor
    dm.setup("fit")
    assert isinstance(dm.train_dataloader().sampler, ResumableSampler)
    train_rows = [r for b in dm.train_dataloader() for r in b["rows"]]
    assert sorted(train_rows) == list(range(48)) and train_rows != list(range(48))
    val = list(dm.val_dataloader())
    assert [b["rows"] for b in val] == [list(range(16))] and val[0]["split"] == "val"


# ---------------------------------------------------------------- string prompts and public layouts
def test_string_prompts_with_markers_give_the_message_batch(processor, tmp_path):
    a, b = _image(tmp_path, "a.png", "red"), _image(tmp_path, "b.png", "blue")
    native = _write(tmp_path / "native.jsonl", [
        {"images": [a], "prompt": _user(None, "What colour?"), "answer": "red"},
        {"images": [a, b], "prompt": _user("Compare ", None, " with ", None, "."), "answer": "first"},
    ])  # fmt: skip
    strings = _write(tmp_path / "strings.jsonl", [
        {"images": [a], "prompt": "What colour?", "answer": "red"},  # no marker: images first
        {"images": [a, b], "prompt": "Compare <image> with <image>.", "answer": "first"},
    ])  # fmt: skip
    markers = _write(tmp_path / "markers.jsonl", [
        {"images": [a], "prompt": "<image>\nWhat colour?", "answer": "red"},
        {"images": [a, b], "prompt": "Compare <image> with <image>.", "answer": "first"},
    ])  # fmt: skip
    want = _first(_dm(processor, native))
    swapped = _first(_dm(processor, _write(tmp_path / "swapped.jsonl", [
        {"images": [a], "prompt": "What colour?", "answer": "red"},
        {"images": [a, b], "prompt": "<image> with <image>. Compare", "answer": "first"},
    ])))  # fmt: skip
    assert not torch.equal(swapped["input_ids"], want["input_ids"])  # marker positions matter
    for source in (strings, markers):
        got = _first(_dm(processor, source))
        _same(got, want)
        assert got["columns"]["answer"] == ["red", "first"]


def _layout_rows(folder: Path) -> tuple[list[dict], dict[str, tuple[list[dict], dict]]]:
    """Two rows in our layout, and the same two in each public layout with its column mapping."""
    a, b = _image(folder, "a.png", "red"), _image(folder, "b.png", "green")
    questions, answers = ["How many objects are there?", "Find x."], ["3", "12"]
    ours = [
        {"images": [img], "prompt": _user(None, q), "answer": ans}
        for img, q, ans in zip((a, b), questions, answers, strict=True)
    ]
    by_name = {
        # image, problem, solution (+ original_question, original_answer); solution with answer tags
        "multimodal-open-r1-8k-verified": ([
            {"image": img, "problem": q, "solution": f"<answer> {ans} </answer>",
             "original_question": q, "original_answer": ans}
            for img, q, ans in zip((a, b), questions, answers, strict=True)
        ], {"images": "image", "prompt": "problem", "answer": "solution"}),
        # images (a list), problem with an <image> marker, answer, id, choices, ground_truth
        "geometry3k": ([
            {"images": [img], "problem": f"<image>{q}", "answer": ans, "id": i,
             "choices": [ans, "7"], "ground_truth": "A"}
            for i, (img, q, ans) in enumerate(zip((a, b), questions, answers, strict=True))
        ], {"prompt": "problem"}),
        # image, problem, solution ("<answer> 3 </answer>")
        "clevr_cogen_a_train": ([
            {"image": img, "problem": q, "solution": f"<answer> {ans} </answer>"}
            for img, q, ans in zip((a, b), questions, answers, strict=True)
        ], {"images": "image", "prompt": "problem", "answer": "solution"}),
    }  # fmt: skip
    return ours, by_name


@pytest.mark.parametrize("name", ["multimodal-open-r1-8k-verified", "geometry3k", "clevr_cogen_a_train"])
def test_public_layouts_give_the_native_batch(name, processor, tmp_path):
    ours, by_name = _layout_rows(tmp_path)
    rows, columns = by_name[name]
    want = _first(_dm(processor, _write(tmp_path / "ours.jsonl", ours)))
    got = _first(_dm(processor, _write(tmp_path / f"{name}.jsonl", rows), columns=columns))
    _same(got, want)
    assert all(
        np.array_equal(np.asarray(g[0]), np.asarray(w[0]))
        for g, w in zip(got["images"], want["images"], strict=True)
    )
    extra = set(rows[0]) - {columns.get(ours, ours) for ours in ("images", "prompt", "answer")}
    assert set(got["columns"]) == {"images", "answer"} | extra
    assert got["columns"]["answer"] == [r[columns.get("answer", "answer")] for r in rows]
    for key in extra:
        assert got["columns"][key] == [r[key] for r in rows]


@pytest.mark.parametrize("name", ["multimodal-open-r1-8k-verified", "geometry3k"])
def test_hub_style_image_features_load(name, processor, tmp_path):
    """Hub datasets hold decoded images: one ``Image`` feature, or a list of them (geometry3k)."""
    ours, by_name = _layout_rows(tmp_path)
    rows, columns = by_name[name]
    column = columns.get("images", "images")
    for r in rows:
        paths = r[column] if isinstance(r[column], list) else [r[column]]
        opened = [{"bytes": (tmp_path / p).read_bytes(), "path": None} for p in paths]
        r[column] = opened if isinstance(r[column], list) else opened[0]
    ds = datasets.Dataset.from_list(rows)
    feature = datasets.Image()
    ds = ds.cast_column(column, datasets.Sequence(feature) if column == "images" else feature)
    ds.to_parquet(str(tmp_path / "hub.parquet"))
    got = _first(_dm(processor, tmp_path / "hub.parquet", columns=columns))
    _same(got, _first(_dm(processor, _write(tmp_path / "ours.jsonl", ours))))


# ---------------------------------------------------------------- text-only prompts
def test_text_only_prompts(processor, tmp_path):
    img = _image(tmp_path, "a.png", "red")
    source = _write(tmp_path / "text.jsonl", [
        {"images": [], "prompt": "Say a colour.", "answer": "red"},
        {"images": [], "prompt": "Say a shape.", "answer": "circle"},
        {"images": [img], "prompt": "What colour?", "answer": "red"},
    ])  # fmt: skip
    text_only, mixed = list(
        _dm(processor, source, batch_size=2)._loader("train", PromptCollator(processor), False)
    )
    assert "pixel_values" not in text_only["vision"] and "image_grid_thw" not in text_only["vision"]
    assert not (text_only["input_ids"] == processor.image_token_id).any()
    assert text_only["images"] == [[], []] and text_only["columns"]["images"] == [[], []]
    tok = processor.tokenizer
    for k, text in enumerate(("Say a colour.", "Say a shape.")):
        assert tok.decode(text_only["input_ids"][k][text_only["attention_mask"][k].bool()]).endswith(
            text + GEN_PROMPT
        )
    both = _first(_dm(processor, source, batch_size=3))  # text-only and image rows in one batch
    assert both["vision"]["image_grid_thw"].shape[0] == 1
    per_row = (both["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert per_row[:2] == [0, 0] and per_row[2] > 0
    assert torch.equal(mixed["input_ids"][0][mixed["attention_mask"][0].bool()],
                       both["input_ids"][2][both["attention_mask"][2].bool()])  # fmt: skip


# ---------------------------------------------------------------- bad rows
@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"problem": "<image> and <image>?"},
            r"row 1: field 'prompt' has 2 <image> marker\(s\) but 'images' lists 1",
        ),
        ({"image": "missing.png"}, r"row 1: field 'images': cannot read image 'missing.png'"),
    ],
    ids=["markers", "missing-image"],
)
def test_bad_string_rows_are_named_or_skipped(bad, message, processor, tmp_path):
    good = {"image": _image(tmp_path, "a.png", "red"), "problem": "What?", "solution": "red"}
    columns = {"images": "image", "prompt": "problem", "answer": "solution"}
    source = _write(tmp_path / "bad.jsonl", [good, {**good, **bad}, good])
    with pytest.raises(BadRowError, match=message):
        _dm(processor, source, columns=columns)
    dm = _dm(processor, source, columns=columns, bad_rows="skip")
    assert dm.datasets["train"]["__row"] == [0, 2] and dm.skipped[str(source)] == {"bad": 1}


@pytest.mark.parametrize(
    "prompt, message",
    [
        (_user(None, "What?") + [{"role": "assistant", "content": "red"}],
         r"row 1: field 'prompt': the last message must be the user's"),
        (_user(None, None, "What?"), r"row 1: field 'prompt' has 2 image part\(s\) but 'images' lists 1"),
    ],
    ids=["last-not-user", "image-parts"],
)  # fmt: skip
def test_bad_message_rows_are_named_or_skipped(prompt, message, processor, tmp_path):
    good = {"images": [_image(tmp_path, "a.png", "red")], "prompt": _user(None, "What?"), "answer": "red"}
    source = _write(tmp_path / "bad.jsonl", [good, {**good, "prompt": prompt}])
    with pytest.raises(BadRowError, match=message):
        _dm(processor, source)
    dm = _dm(processor, source, bad_rows="skip")
    assert dm.datasets["train"]["__row"] == [0] and dm.skipped[str(source)] == {"bad": 1}


def test_rows_whose_types_vary_load_as_written(processor, tmp_path):
    """Arrow needs one type per column; a JSON file need not have it (a numeric answer among strings,
    string and message prompts mixed, a bare image beside a list, a column first seen in a later row)."""
    a = _image(tmp_path, "a.png", "red")
    native = _write(tmp_path / "native.jsonl", [
        {"images": [a], "prompt": _user(None, "What colour?"), "answer": "red"},
        {"images": [a], "prompt": _user(None, "How many?"), "answer": "1"},
        {"images": [], "prompt": _user("Half of 5?"), "answer": "1"},
    ])  # fmt: skip
    varied = _write(tmp_path / "varied.jsonl", [
        {"images": a, "prompt": "What colour?", "answer": "red"},
        {"images": [a], "prompt": _user(None, "How many?"), "answer": 1},
        {"images": [], "prompt": "Half of 5?", "answer": 2.5, "task": "maths"},
    ])  # fmt: skip
    got = _first(_dm(processor, varied))
    _same(got, _first(_dm(processor, native)))
    assert got["columns"]["answer"] == ["red", 1, 2.5] and got["columns"]["task"] == [None, None, "maths"]


def test_missing_prompt_column_names_the_mapping(processor, tmp_path):
    source = _write(tmp_path / "r.jsonl", [{"image": _image(tmp_path, "a.png", "red"), "problem": "q"}])
    with pytest.raises(KeyError, match=r"missing column 'prompt' \(map it with data.columns"):
        _dm(processor, source, columns={"images": "image"})
    with pytest.raises(KeyError, match=r"column mapping names 'question', but the columns are"):
        _dm(processor, source, columns={"images": "image", "prompt": "question"})


# ---------------------------------------------------------------- overlong prompts
def test_overlong_prompts_are_dropped_and_counted(processor, synthetic_dir):
    source = synthetic_dir / "prompt_train.jsonl"
    full = _dm(processor, source, batch_size=48)
    lengths = [full._check_row(row) for row in full.datasets["train"]]
    batch = _first(full)
    assert batch["attention_mask"].sum(-1).tolist() == lengths  # the checked length is the collated one
    tasks = batch["columns"]["task"]
    limit = max(n for n, t in zip(lengths, tasks, strict=True) if t != "compare")
    assert all(n > limit for n, t in zip(lengths, tasks, strict=True) if t == "compare")  # two images

    with pytest.raises(BadRowError, match=rf"row \d+: \d+ tokens > max_length {limit}"):
        _dm(processor, source, max_length=limit)
    dm = _dm(processor, source, max_length=limit, overlong="drop", batch_size=48)
    assert dm.skipped[str(source)] == {"overlong": tasks.count("compare")}
    kept = _first(dm)
    assert "compare" not in kept["columns"]["task"] and len(kept["rows"]) == 48 - tasks.count("compare")
    assert kept["attention_mask"].sum(-1).max() <= limit


def test_system_prompt_goes_before_prompts_without_one(processor, tmp_path):
    image = _image(tmp_path, "a.png", "red")
    own = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *_user(None, "Colour?")]
    path = _write(
        tmp_path / "p.jsonl",
        [{"images": [image], "prompt": _user(None, "Colour?")}, {"images": [image], "prompt": own}],
    )
    batch = _first(_dm(processor, path, system_prompt="Answer in <answer></answer> tags."))
    first, second = batch["prompts"]
    assert first[0] == {
        "role": "system",
        "content": [{"type": "text", "text": "Answer in <answer></answer> tags."}],
    }
    assert first[1:] == _user(None, "Colour?")
    assert second == own  # a prompt's own system message is kept, not doubled
    text = processor.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert "Answer in <answer></answer> tags." in text
    plain = _first(_dm(processor, path))
    assert plain["prompts"][0] == _user(None, "Colour?")
