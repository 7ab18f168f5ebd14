"""Rows of a data source: column mapping, bad rows named or skipped and counted, overlong rows (the
limit is exact, never cut), invalid JSON lines."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from lightning_vlm.data.rows import BadRowError
from tests.helpers.sft_data import (
    END,
    assistant,
    datamodule,
    draw,
    expected_image_tokens,
    noisy_png,
    one_batch,
    real_ids,
    user,
    write_jsonl,
)

# ---------------------------------------------------------------------- column mapping


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


# ---------------------------------------------------------------------- bad rows


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
        r"field 'messages': message 1 needs a 'role' string and 'content'",
    ),
    "empty_reply": (
        ["img/good.png"],
        [user("Colour?", 1), assistant("")],
        r"field 'messages': message 1, the assistant's reply, is empty",
    ),
    "blank_middle_reply": (
        ["img/good.png"],
        [user("Colour?", 1), {"role": "assistant", "content": []}, user("Again?"), assistant("red")],
        r"field 'messages': message 1, the assistant's reply, is empty",
    ),
    "number_content": (  # a number among strings: Arrow cannot store it as text
        ["img/good.png"],
        [user("Colour?", 1), {"role": "assistant", "content": 5}],
        r"field 'messages': message 1 content must be a string or a list",
    ),
    "number_text": (
        ["img/good.png"],
        [user("Colour?", 1), {"role": "assistant", "content": [{"type": "text", "text": 7}]}],
        r"field 'messages': message 1 has a bad part \{'type': 'text', 'text': 7\}",
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
    with pytest.raises(BadRowError, match=rf"^{re.escape(path)}: row 0: field 'images'.*truncated"):
        one_batch(dm)


def test_all_rows_bad_is_an_error(processor, tmp_path):
    rows = [{"images": ["img/nowhere.png"], "messages": [user("Colour?", 1), assistant("red")]}] * 2
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: no usable rows left"):
        datamodule(processor, path, bad_rows="skip")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("broken.jsonl", '{"images": [], "messages": []}\n{"images": [,\n', "line 2 is not valid JSON"),
        ("broken.json", '[{"images": [], "messages": []},\n {"images": [,\n]', "line 2 is not valid JSON"),
        ("list.jsonl", '{"images": [], "messages": []}\n[1, 2]\n', "line 2 is not a JSON object"),
        ("list.json", '[{"images": [], "messages": []},\n 7]', "item 1 is not a JSON object"),
    ],
)
def test_invalid_json_line_is_named(processor, tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}"):
        datamodule(processor, path).setup("fit")


def test_a_file_that_is_not_utf8_names_file_and_line(processor, tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = '{"images": [], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}'
    path.write_bytes((good + "\n" + good.replace("Yo", "Caf\xe9")).encode("latin-1"))
    with pytest.raises(BadRowError, match=rf"^{re.escape(str(path))}: line 2 is not UTF-8"):
        datamodule(processor, str(path))
    bom = tmp_path / "bom.jsonl"  # a UTF-8 byte order mark, as some editors write it, is fine
    bom.write_bytes(b"\xef\xbb\xbf" + (good + "\n").encode())
    assert len(datamodule(processor, str(bom)).datasets["train"]) == 1


@pytest.mark.parametrize("text", ["", "\n\n", "[]"], ids=["empty", "blank-lines", "empty-list"])
def test_an_empty_file_says_it_holds_no_rows(processor, tmp_path, text):
    path = tmp_path / ("empty.json" if text == "[]" else "empty.jsonl")
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: holds no rows$"):
        datamodule(processor, str(path))


def test_a_field_first_seen_in_a_later_row_is_kept(processor, tmp_path):
    name = draw(tmp_path / "img" / "a.png", (64, 64), (220, 30, 30))
    row = {"images": [name], "messages": [user("Colour?", 1), assistant("red")]}
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": row["messages"]}, row, {**row, "task": "colour"}])
    with pytest.raises(
        BadRowError, match=r"row 0: field 'messages' has 1 image placeholder\(s\) but 'images' lists 0"
    ):
        datamodule(processor, path)  # not "missing column 'images'": the column is in rows 1 and 2
    assert datamodule(processor, path, bad_rows="skip").datasets["train"]["task"] == [None, "colour"]


# ---------------------------------------------------------------------- overlong rows


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


@pytest.mark.parametrize("family", ["gemma3", "gemma4", "llava_onevision", "smolvlm", "internvl"])
def test_row_lengths_count_the_tokens_around_each_image(family, long_rows):
    """Gemma's processors add begin/end-of-image tokens (Gemma 3 also newlines) around an image's tokens,
    SmolVLM tile markers, InternVL <img>/</img>, and LLaVA-OneVision expands two images of one prompt
    differently from one: the checked length of each row is still its collated length, so the limit stays exact."""
    from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone

    processor = VLMBackbone(BackboneConfig(tiny=TinyVLM(family=family))).processor
    path, rows, _ = long_rows
    real = collated_lengths(processor, path, len(rows))
    for limit in sorted(set(real.values()))[1:]:
        for max_length in (limit, limit - 1):
            dm = datamodule(processor, path, max_length=max_length, overlong="drop")
            assert sorted(dm.datasets["train"]["__row"]) == sorted(i for i, n in real.items() if n <= max_length)


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
