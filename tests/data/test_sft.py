"""Tests for the SFT datamodule: label masks, images, prompts, column mapping, row checks and sources."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import datasets
import lightning as L
import pytest
import torch
from PIL import Image, ImageDraw

from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone
from lightning_vlm.data import SFTDataModule
from lightning_vlm.data.rows import BadRowError

END = "<|im_end|>"
GEN_PROMPT = "<|im_start|>assistant\n"


# ---------------------------------------------------------------------- helpers and fixtures
@pytest.fixture(scope="module")
def backbone():
    return VLMBackbone(BackboneConfig(tiny=TinyVLM(family="qwen2_vl")))


@pytest.fixture(scope="module")
def processor(backbone):
    return backbone.processor


def draw(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    """Save a PNG with one filled ellipse at ``path`` (``<dir>/img/x.png``); return ``img/x.png``."""
    image = Image.new("RGB", size, (255, 255, 255))
    w, h = size
    ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return f"{path.parent.name}/{path.name}"


def user(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def datamodule(processor, train: str, val: str | None = None, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(train=train, val=val, **kwargs)
    dm.processor = processor
    dm.setup("fit")
    return dm


def one_batch(dm: SFTDataModule, split: str = "train") -> dict:
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    batches = list(loader)
    assert len(batches) == 1, "the tests size batches to hold the whole split"
    return batches[0]


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of True."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def real_ids(batch: dict, k: int) -> list[int]:
    return batch["input_ids"][k][batch["attention_mask"][k].bool()].tolist()


def expected_image_tokens(processor, messages: list[dict], images: list[Image.Image]) -> int:
    """Image tokens the processor itself produces for one conversation, with no length limit."""
    text = processor.apply_chat_template(messages, tokenize=False)
    enc = processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt")
    return int((enc["input_ids"] == processor.image_token_id).sum())


# ---------------------------------------------------------------------- 1. label masks
def test_single_turn_mask_is_exactly_the_reply(processor, tmp_path):
    # The reply words also occur in the questions: the mask must be positional, not textual.
    cases = [
        ((64, 64), "Is the shape red or blue?", "red"),
        ((112, 96), "Is it blue?", "blue"),
        ((80, 112), "How many shapes are there? 1, 2 or 3?", "3"),
        ((96, 64), "Describe it.", "It is a green circle, drawn in the middle."),
    ]
    rows = [
        {
            "images": [draw(tmp_path / "img" / f"{i}.png", size, (200, 30, 30))],
            "messages": [user(q, 1), assistant(a)],
        }
        for i, (size, q, a) in enumerate(cases)
    ]
    dm = datamodule(processor, write_jsonl(tmp_path / "t.jsonl", rows), batch_size=len(rows))
    batch = one_batch(dm)
    tok, image_id = processor.tokenizer, processor.image_token_id
    mask, attn, ids = batch["labels_mask"], batch["attention_mask"].bool(), batch["input_ids"]
    assert mask.dtype == torch.bool and mask.shape == ids.shape
    assert (~attn).any(), "rows of different lengths should leave left padding"
    assert not (mask & ~attn).any(), "padding must never be a label"
    assert not (mask & (ids == image_id)).any(), "image tokens must never be labels"
    for k, row in enumerate(batch["rows"]):
        answer = cases[row][2]
        assert tok.decode(ids[k][mask[k]]) == answer + END
        # Left padding: padding sits before every real token.
        assert attn[k].tolist() == sorted(attn[k].tolist())
        # One contiguous run, directly after the generation prompt.
        (start, end), *rest = runs(mask[k].tolist())
        assert not rest
        assert tok.decode(ids[k][:start][attn[k][:start]]).endswith(GEN_PROMPT)
        assert tok.decode(ids[k][end:]) == "\n"


def test_two_turn_mask_covers_both_replies_only(processor, tmp_path):
    messages = [
        user("What colour is the shape?", 1),
        assistant("red"),
        user("How many shapes?"),
        assistant("2"),
    ]
    one = [user("What shape is in the image?", 1), assistant("circle")]
    rows = [
        {"images": [draw(tmp_path / "img" / "a.png", (96, 96), (200, 30, 30))], "messages": messages},
        {"images": [draw(tmp_path / "img" / "b.png", (64, 64), (30, 30, 200))], "messages": one},
    ]
    dm = datamodule(processor, write_jsonl(tmp_path / "t.jsonl", rows), batch_size=2)
    batch = one_batch(dm)
    tok = processor.tokenizer
    k = batch["rows"].index(0)
    ids, mask = batch["input_ids"][k], batch["labels_mask"][k]
    assert tok.decode(ids[mask]) == f"red{END}2{END}"
    spans = runs(mask.tolist())
    assert [tok.decode(ids[a:b]) for a, b in spans] == [f"red{END}", f"2{END}"]
    between = tok.decode(ids[spans[0][1] : spans[1][0]])
    assert between == f"\n<|im_start|>user\nHow many shapes?{END}\n{GEN_PROMPT}"
    assert not (mask & (ids == processor.image_token_id)).any()
    j = 1 - k
    assert tok.decode(batch["input_ids"][j][batch["labels_mask"][j]]) == f"circle{END}"


# ---------------------------------------------------------------------- 2. several images
def test_multi_image_rows_and_image_in_second_turn(processor, tmp_path):
    img = tmp_path / "img"
    sizes = {"a": (64, 64), "b": (112, 80), "c": (80, 112), "d": (96, 96), "e": (112, 112)}
    names = {k: draw(img / f"{k}.png", size, (30, 160, 50)) for k, size in sizes.items()}
    rows = [
        {"images": [names["a"]], "messages": [user("What colour is the shape?", 1), assistant("green")]},
        {
            "images": [names["b"], names["c"]],
            "messages": [
                user("Which image shows the green shape, the first or the second?", 2),
                assistant("first"),
            ],
        },
        {
            "images": [names["d"]],
            "messages": [
                user("How many shapes are there?"),
                assistant("1"),
                user("What colour is the shape?", 1),
                assistant("green"),
            ],
        },
        {
            "images": [names["e"], names["a"]],
            "messages": [user("Which is bigger?", 2), assistant("first")],
        },
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    dm = datamodule(processor, path, val=path, batch_size=len(rows))
    merge = processor.image_processor.merge_size
    image_id = processor.image_token_id
    tok = processor.tokenizer
    for split in ("train", "val"):
        batch = one_batch(dm, split)
        grid = batch["vision"]["image_grid_thw"]
        assert grid.shape == (sum(len(r["images"]) for r in rows), 3)
        # Runs of image tokens, in batch order, match the grid rows one for one.
        run_lengths = []
        for k, row in enumerate(batch["rows"]):
            ids = real_ids(batch, k)
            image_runs = runs([t == image_id for t in ids])
            assert len(image_runs) == len(rows[row]["images"])
            run_lengths += [b - a for a, b in image_runs]
        assert run_lengths == (grid.prod(-1) // merge**2).tolist()
        assert batch["vision"]["pixel_values"].shape[0] == int(grid.prod(-1).sum())
        # The second-turn image sits after the first reply, and both replies are labels.
        k = batch["rows"].index(2)
        ids, mask = batch["input_ids"][k], batch["labels_mask"][k]
        first_label = int(mask.nonzero()[0])
        first_image = int((ids == image_id).nonzero()[0])
        assert first_label < first_image
        assert tok.decode(ids[mask]) == f"1{END}green{END}"


# ---------------------------------------------------------------------- 3. validation prompts
def test_validation_prompts_and_answers(processor, tmp_path):
    img = tmp_path / "img"
    rows = [
        {
            "images": [draw(img / "a.png", (64, 64), (220, 30, 30))],
            "messages": [user("What colour is the shape?", 1), assistant("red")],
        },
        {
            "images": [draw(img / "b.png", (112, 96), (30, 70, 220))],
            "messages": [
                user("What shape is it?", 1),
                assistant("circle"),
                user("Which colour?"),
                assistant("blue"),
            ],
        },
        {
            "images": [
                draw(img / "c.png", (80, 80), (30, 160, 50)),
                draw(img / "d.png", (96, 64), (0, 0, 0)),
            ],
            "messages": [user("Which image shows the green shape?", 2), assistant("first")],
        },
    ]
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    dm = datamodule(processor, path, val=path, batch_size=2, eval_batch_size=len(rows))
    batch = one_batch(dm, "val")
    tok = processor.tokenizer
    assert batch["rows"] == [0, 1, 2], "validation keeps the file order"
    assert batch["answers"] == ["red", "blue", "first"]
    prompt = batch["prompt"]
    assert set(prompt) >= {"input_ids", "attention_mask", "vision"}
    assert torch.equal(prompt["vision"]["image_grid_thw"], batch["vision"]["image_grid_thw"])
    assert torch.equal(prompt["vision"]["pixel_values"], batch["vision"]["pixel_values"])
    assert prompt["attention_mask"][:, -1].all(), "prompts are left-padded for generation"
    for k, row in enumerate(rows):
        assert batch["answers"][k] == row["messages"][-1]["content"][0]["text"]
        p_ids = prompt["input_ids"][k][prompt["attention_mask"][k].bool()].tolist()
        full = real_ids(batch, k)
        text = tok.decode(p_ids)
        assert text.endswith(GEN_PROMPT)
        assert batch["answers"][k] not in text
        # The prompt is the full conversation cut right before the final reply.
        assert full[: len(p_ids)] == p_ids
        assert tok.decode(full[len(p_ids) :]) == batch["answers"][k] + END + "\n"
        assert text.count("<|image_pad|>") == full.count(processor.image_token_id) > 0
    # The earlier reply of the two-turn row stays in its prompt; the final one does not.
    second = tok.decode(prompt["input_ids"][1][prompt["attention_mask"][1].bool()])
    assert f"circle{END}" in second and "blue" not in second


# ---------------------------------------------------------------------- 4. column mapping
@pytest.fixture
def renamed_file(tmp_path):
    name = draw(tmp_path / "img" / "a.png", (64, 64), (220, 30, 30))
    row = {"pics": [name], "conversation": [user("What colour is the shape?", 1), assistant("red")]}
    return write_jsonl(tmp_path / "renamed.jsonl", [row, row])


def test_column_mapping_loads_renamed_columns(processor, renamed_file):
    dm = datamodule(
        processor, renamed_file, columns={"messages": "conversation", "images": "pics"}, batch_size=2
    )
    batch = one_batch(dm)
    assert sorted(batch["rows"]) == [0, 1]
    assert batch["vision"]["image_grid_thw"].shape[0] == 2
    assert processor.tokenizer.decode(batch["input_ids"][0][batch["labels_mask"][0]]) == f"red{END}"


def test_missing_column_names_column_and_file(processor, renamed_file):
    with pytest.raises(KeyError, match=rf"{re.escape(renamed_file)}: missing column 'messages'"):
        datamodule(processor, renamed_file)
    # Mapping only one column still names the other one.
    with pytest.raises(KeyError, match=rf"{re.escape(renamed_file)}: missing column 'images'"):
        datamodule(processor, renamed_file, columns={"messages": "conversation"})


def test_mapping_to_absent_column_names_it(processor, renamed_file):
    with pytest.raises(KeyError, match=rf"{re.escape(renamed_file)}.*'photos'"):
        datamodule(processor, renamed_file, columns={"messages": "conversation", "images": "photos"})


# ---------------------------------------------------------------------- 5. bad rows
def noisy_png(path: Path, size: int = 96) -> bytes:
    """A PNG of random pixels (large, barely compressible), saved at ``path``; return its bytes."""
    rng = random.Random(0)
    Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(path)
    return path.read_bytes()


BAD_ROWS = {
    # kind: (images, messages, regex after "row N: ")
    "unreadable": (
        ["img/garbage.png"],
        [user("Colour?", 1), assistant("red")],
        r"field 'images'.*'img/garbage\.png'",
    ),
    "truncated": (
        ["img/truncated.png"],
        [user("Colour?", 1), assistant("red")],
        r"field 'images'.*'img/truncated\.png'.*truncated",
    ),
    "missing": (
        ["img/nowhere.png"],
        [user("Colour?", 1), assistant("red")],
        r"field 'images'.*'img/nowhere\.png'",
    ),
    "more_placeholders": (
        ["img/good.png"],
        [user("Colour?", 2), assistant("red")],
        r"field 'messages' has 2 image placeholder\(s\) but 'images' lists 1",
    ),
    "fewer_placeholders": (
        ["img/good.png", "img/good.png"],
        [user("Colour?", 1), assistant("red")],
        r"field 'messages' has 1 image placeholder\(s\) but 'images' lists 2",
    ),
    "last_not_assistant": (
        ["img/good.png"],
        [user("Colour?", 1), assistant("red"), user("And the shape?")],
        r"field 'messages': the last message must be the assistant's reply",
    ),
    "no_content": (
        ["img/good.png"],
        [user("Colour?", 1), {"role": "assistant"}],
        r"field 'messages': message 1 needs 'role' and 'content'",
    ),
}


@pytest.fixture
def bad_file(request, tmp_path):
    """Rows good, bad, good, bad, good of one kind of bad row; returns (path, regex of the error)."""
    img = tmp_path / "img"
    good = {
        "images": [draw(img / "good.png", (64, 64), (220, 30, 30))],
        "messages": [user("Colour?", 1), assistant("red")],
    }
    (img / "garbage.png").write_bytes(b"this is not a png\n" * 20)
    raw = noisy_png(img / "noisy.png")
    (img / "truncated.png").write_bytes(raw[: len(raw) // 2])
    images, messages, regex = BAD_ROWS[request.param]
    bad = {"images": images, "messages": messages}
    return write_jsonl(tmp_path / f"{request.param}.jsonl", [good, bad, good, bad, good]), regex


@pytest.mark.parametrize("bad_file", list(BAD_ROWS), indirect=True)
def test_bad_row_errors_name_file_row_and_field(processor, bad_file):
    path, regex = bad_file
    with pytest.raises(BadRowError, match=rf"^{re.escape(path)}: row 1: {regex}"):
        datamodule(processor, path)


@pytest.mark.parametrize("bad_file", list(BAD_ROWS), indirect=True)
def test_bad_rows_skip_drops_and_counts(processor, bad_file):
    path, _ = bad_file
    dm = datamodule(processor, path, bad_rows="skip", batch_size=8)
    assert dm.skipped[path] == {"bad": 2}
    assert sorted(dm.datasets["train"]["__row"]) == [0, 2, 4]
    batch = one_batch(dm)
    assert sorted(batch["rows"]) == [0, 2, 4]
    assert batch["vision"]["image_grid_thw"].shape[0] == 3


def test_truncated_image_is_caught_at_setup_only_when_checking_images(processor, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    raw = noisy_png(img / "noisy.png")
    (img / "truncated.png").write_bytes(raw[: len(raw) // 2])
    rows = [{"images": ["img/truncated.png"], "messages": [user("Colour?", 1), assistant("red")]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(BadRowError, match=r"row 0: field 'images'.*truncated"):
        datamodule(processor, path)  # check_images=True is the default
    # Headers alone look fine: setup passes and the row only fails when collated.
    dm = datamodule(processor, path, check_images=False)
    assert dm.skipped[path] == {}
    with pytest.raises(BadRowError, match=r"row 0: field 'images'.*truncated"):
        one_batch(dm)


def test_all_rows_bad_is_an_error(processor, tmp_path):
    rows = [{"images": ["img/nowhere.png"], "messages": [user("Colour?", 1), assistant("red")]}] * 2
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: no usable rows left"):
        datamodule(processor, path, bad_rows="skip")


# ---------------------------------------------------------------------- 6. overlong rows
@pytest.fixture
def long_rows(tmp_path):
    """Rows of distinct token lengths: text-only, small, non-square, large (downscaled) and two images."""
    img = tmp_path / "img"
    a = draw(img / "a.png", (64, 64), (220, 30, 30))
    b = draw(img / "b.png", (112, 72), (30, 70, 220))
    c = draw(img / "c.png", (180, 180), (30, 160, 50))
    rows = [
        {"images": [], "messages": [user("How many shapes are there?"), assistant("2")]},
        {"images": [a], "messages": [user("What colour is the shape?", 1), assistant("red")]},
        {"images": [b], "messages": [user("What colour is the shape?", 1), assistant("blue")]},
        {"images": [c], "messages": [user("What colour is the shape?", 1), assistant("green")]},
        {"images": [a, b], "messages": [user("Which image shows the red shape?", 2), assistant("first")]},
    ]
    return write_jsonl(tmp_path / "long.jsonl", rows), rows, tmp_path


def collated_lengths(processor, path: str, n: int) -> dict[int, int]:
    batch = one_batch(datamodule(processor, path, batch_size=n, max_length=100_000))
    return dict(zip(batch["rows"], batch["attention_mask"].sum(-1).tolist(), strict=True))


def test_overlong_limit_is_exact_per_row(processor, long_rows):
    path, rows, _ = long_rows
    real = collated_lengths(processor, path, len(rows))
    assert len(set(real.values())) == len(rows), "the fixture should give distinct lengths"
    for limit in sorted(real.values()):
        # A row exactly at the limit is kept; one token over is dropped.
        for max_length in (limit, limit - 1):
            keep = sorted(i for i, n in real.items() if n <= max_length)
            if not keep:
                with pytest.raises(ValueError, match="no usable rows left"):
                    datamodule(processor, path, max_length=max_length, overlong="drop")
                continue
            dm = datamodule(processor, path, max_length=max_length, overlong="drop")
            assert sorted(dm.datasets["train"]["__row"]) == keep
            dropped = len(rows) - len(keep)
            assert dm.skipped[path] == ({"overlong": dropped} if dropped else {})


def test_overlong_error_names_row_and_real_length(processor, long_rows):
    path, rows, _ = long_rows
    real = collated_lengths(processor, path, len(rows))
    limit = real[0] - 1  # row 0 is the first row over the limit, whatever follows
    with pytest.raises(
        BadRowError, match=rf"^{re.escape(path)}: row 0: {real[0]} tokens > max_length {limit}"
    ):
        datamodule(processor, path, max_length=limit)
    longest = max(real, key=real.get)
    limit = sorted(real.values())[-2]  # only the longest row is over
    with pytest.raises(BadRowError, match=rf"row {longest}: {real[longest]} tokens > max_length {limit}"):
        datamodule(processor, path, max_length=limit, overlong="error")


def test_kept_rows_are_never_cut(processor, long_rows):
    path, rows, folder = long_rows
    real = collated_lengths(processor, path, len(rows))
    max_length = sorted(real.values())[2]
    dm = datamodule(processor, path, max_length=max_length, overlong="drop", batch_size=len(rows))
    batch = one_batch(dm)
    assert dm.skipped[path] == {"overlong": sum(n > max_length for n in real.values())} == {"overlong": 2}
    image_id = processor.image_token_id
    for k, row in enumerate(batch["rows"]):
        images = [Image.open(folder / name).convert("RGB") for name in rows[row]["images"]]
        ids = real_ids(batch, k)
        assert len(ids) == real[row]
        assert ids.count(image_id) == expected_image_tokens(processor, rows[row]["messages"], images)
        assert processor.tokenizer.decode(batch["input_ids"][k][batch["labels_mask"][k]]).endswith(END)


# ---------------------------------------------------------------------- 7. the processor hand-off
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


# ---------------------------------------------------------------------- 8. images as bytes
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


# ---------------------------------------------------------------------- string content in jsonl
def test_string_content_mixed_with_part_lists(processor, tmp_path):
    name = draw(tmp_path / "img" / "a.png", (64, 64), (220, 30, 30))
    rows = [
        {
            "images": [name],
            "messages": [user("How many shapes are there?", 1), {"role": "assistant", "content": "2"}],
        },
        {
            "images": [],
            "messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"}],
        },
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    dm = datamodule(processor, path, val=path, eval_batch_size=2)
    batch = one_batch(dm, "val")
    assert batch["answers"] == ["2", "red"]
    tok = processor.tokenizer
    assert [tok.decode(batch["input_ids"][k][batch["labels_mask"][k]]) for k in range(2)] == [
        f"2{END}",
        f"red{END}",
    ]


def test_invalid_json_line_is_named(processor, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"images": [], "messages": []}\n{"images": [,\n')
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2 is not valid JSON"):
        datamodule(processor, path).setup("fit")
