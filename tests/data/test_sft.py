"""The SFT datamodule: label masks, several images, validation prompts and answers, string content."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_vlm.data.collate import encode, render
from lightning_vlm.data.rows import BadRowError, open_image
from tests.helpers.processing import count_image_processing
from tests.helpers.sft_data import (
    END,
    GEN_PROMPT,
    assistant,
    datamodule,
    draw,
    one_batch,
    real_ids,
    runs,
    user,
    write_jsonl,
)

# ---------------------------------------------------------------------- label masks


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


# ---------------------------------------------------------------------- several images


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
        {"images": [names["e"], names["a"]], "messages": [user("Which is bigger?", 2), assistant("first")]},
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


def test_tiled_images_with_their_markers_line_up_with_the_labels(tmp_path):
    """SmolVLM (Idefics3 layout): each <image> expands to tiles framed by <fake_token_around_image> and
    <row_i_col_j> markers plus a <global-img> view, and the processor takes each text's own images. Labels
    are exactly the replies, also with two images side by side, an image in the second turn and no image."""
    from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone

    processor = VLMBackbone(BackboneConfig(tiny=TinyVLM(family="smolvlm"))).processor
    img = tmp_path / "img"
    names = {
        k: draw(img / f"{k}.png", size, (30, 160, 50)) for k, size in (("a", (56, 56)), ("b", (112, 80)))
    }
    rows = [
        {"images": [names["a"]], "messages": [user("What colour is the shape?", 1), assistant("green")]},
        {"images": [names["b"], names["a"]], "messages": [user("Which is bigger?", 2), assistant("first")]},
        {"images": [], "messages": [user("Say red."), assistant("red")]},
        {
            "images": [names["b"]],
            "messages": [user("How many?"), assistant("1"), user("Colour?", 1), assistant("green")],
        },
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    batch = one_batch(datamodule(processor, path, batch_size=len(rows)))
    tok = processor.tokenizer
    end = "<end_of_utterance>"
    replies = {0: f"green{end}", 1: f"first{end}", 2: f"red{end}", 3: f"1{end}green{end}"}
    globals_ = tok.convert_tokens_to_ids("<global-img>")
    for k, row in enumerate(batch["rows"]):
        ids, mask = batch["input_ids"][k], batch["labels_mask"][k]
        assert tok.decode(ids[mask]).replace(" ", "") == replies[row]  # "Assistant: green": " green" a token
        assert int((ids == globals_).sum()) == len(rows[row]["images"])
    tiles = 1 + 4  # a global view and 2 x 2 tiles (both images fill 112 px in their longer side)
    assert batch["vision"]["pixel_values"].shape == (4, 2 * tiles, 3, 56, 56)  # per text, padded to 2 images


def test_image_delimiters_the_processor_adds_carry_no_label(tmp_path):
    """InternVL's processor turns each <IMG_CONTEXT> placeholder into <img>, the tiles' context tokens,
    </img>: no token of that run carries a label, with one and two images."""
    from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone

    processor = VLMBackbone(BackboneConfig(tiny=TinyVLM(family="internvl"))).processor
    a, b = (draw(tmp_path / "img" / f"{k}.png", (112, 80), (30, 160, 50)) for k in "ab")
    answers = ["first", "green"]
    rows = [{"images": [a, b], "messages": [user("Which is green?", 2), assistant(answers[0])]},
            {"images": [a], "messages": [user("What colour is it?", 1), assistant(answers[1])]}]  # fmt: skip
    batch = one_batch(datamodule(processor, write_jsonl(tmp_path / "t.jsonl", rows), batch_size=2))
    tok, start, end = processor.tokenizer, processor.start_image_token_id, processor.end_image_token_id
    for k, row in enumerate(batch["rows"]):
        ids, mask = batch["input_ids"][k], batch["labels_mask"][k]
        assert tok.decode(ids[mask]) == answers[row] + END
        assert (ids == start).sum() == (ids == end).sum() == len(rows[row]["images"])


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_image_expansions_with_other_tokens_keep_the_mask_exact(family, tmp_path):
    """Gemma's processors expand an image placeholder into begin/end-of-image tokens around the image tokens
    (Gemma 3 also into newlines, tokenised with the text around them): the replies are still exactly the
    labels, and the images reach the batch in their rows' order."""
    from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone

    processor = VLMBackbone(BackboneConfig(tiny=TinyVLM(family=family))).processor
    img = tmp_path / "img"
    a, b = draw(img / "a.png", (64, 64), (200, 30, 30)), draw(img / "b.png", (112, 80), (30, 30, 200))
    turns = [user("How many shapes?"), assistant("1"), user("Which is red, the first or the second?", 2)]
    rows = [
        {"images": [a, b], "messages": [*turns, assistant("first")]},
        {"images": [b], "messages": [user("What colour is it?", 1), assistant("blue")]},
        {"images": [], "messages": [user("Say hi."), assistant("hi")]},
    ]
    batch = one_batch(datamodule(processor, write_jsonl(tmp_path / "t.jsonl", rows), batch_size=len(rows)))
    tok, end = processor.tokenizer, processor.tokenizer.eos_token
    vision = [tok.convert_tokens_to_ids(getattr(tok, n)) for n in ("boi_token", "eoi_token", "image_token")]
    replies = {0: f"1{end}first{end}", 1: f"blue{end}", 2: f"hi{end}"}
    for k, row in enumerate(batch["rows"]):
        ids, mask = batch["input_ids"][k], batch["labels_mask"][k]
        assert tok.decode(ids[mask]) == replies[row]
        assert not any(t in vision for t in ids[mask].tolist())
        assert (ids == vision[0]).sum() == len(rows[row]["images"])  # one begin-of-image per image
    assert not (batch["labels_mask"] & ~batch["attention_mask"].bool()).any()


# ---------------------------------------------------------------------- validation prompts


def test_validation_prompts_and_answers(processor, tmp_path, monkeypatch):
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
    images = [open_image(ref, str(tmp_path), k) for k, row in enumerate(rows) for ref in row["images"]]
    texts = [render(processor, row["messages"][:-1], add_generation_prompt=True) for row in rows]
    want = encode(processor, texts, images)  # the prompts processed on their own
    processed = count_image_processing(monkeypatch, processor)
    batch = one_batch(dm, "val")
    assert processed == [len(images)]  # once for the sequences and their prompts, not once for each
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(batch["prompt"][key], want[key]), key
    assert want["vision"].keys() == batch["prompt"]["vision"].keys()
    for key, value in want["vision"].items():
        assert torch.equal(batch["prompt"]["vision"][key], value), key
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


# ---------------------------------------------------------------------- TRL's prompt-completion rows


def test_prompt_completion_rows_label_only_the_completion(processor, tmp_path):
    img = tmp_path / "img"
    rows = [  # conversational (an earlier assistant turn in the prompt: context, no loss), then plain text
        {
            "images": [draw(img / "a.png", (64, 64), (220, 30, 30))],
            "prompt": [user("What colour is the shape?", 1), assistant("red"), user("And its shape?")],
            "completion": [assistant("circle")],
        },
        {
            "images": [draw(img / "b.png", (96, 64), (30, 70, 220))],
            "prompt": "<image>Its colour?",
            "completion": "blue",
        },
        {"images": [], "prompt": "Say green.", "completion": "green"},
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    dm = datamodule(processor, path, val=path, batch_size=len(rows))
    tok = processor.tokenizer
    for split in ("train", "val"):
        batch = one_batch(dm, split)
        labelled = [tok.decode(batch["input_ids"][k][batch["labels_mask"][k]]) for k in range(len(rows))]
        want = {0: "circle", 1: "blue", 2: "green"}
        assert labelled == [want[r] + END for r in batch["rows"]]  # not the prompt's "red"
        assert batch["input_ids"].eq(processor.image_token_id).any(1).tolist() == [
            r < 2 for r in batch["rows"]
        ]
    assert batch["answers"] == ["circle", "blue", "green"]
    assert tok.decode(batch["prompt"]["input_ids"][0]).endswith("And its shape?<|im_end|>\n" + GEN_PROMPT)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Colour?", "completion": None}, r"row 1: field 'completion' is missing"),
        ({"prompt": "Colour?", "completion": 3}, r"row 1: field 'completion': expected a non-empty list"),
        ({"prompt": 7, "completion": "red"}, r"row 1: field 'prompt': expected a non-empty list"),
        (
            {"prompt": "Colour?", "completion": " "},
            r"row 1: field 'completion': message 0, the assistant's reply",
        ),
        ({"prompt": [assistant("hi")], "completion": "red"}, r"row 1: field 'prompt': the last message must"),
        ({"messages": [user("q"), assistant("a")], "completion": "red"}, r"row 1: has both 'messages' and"),
    ],
    ids=["no-completion", "completion-number", "prompt-number", "blank-completion", "prompt-role", "both"],
)
def test_bad_prompt_completion_rows_name_file_row_and_field(processor, tmp_path, row, message):
    good = {"images": [], "prompt": "Colour?", "completion": "red"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, {"images": [], **row}])
    with pytest.raises(BadRowError, match=re.escape(path) + ": " + message):
        datamodule(processor, path)
    dm = datamodule(processor, path, bad_rows="skip")
    assert dm.skipped[path] == {"bad": 1} and len(dm.datasets["train"]) == 1


def test_neither_format_names_both(processor, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"images": [], "prompt": "Colour?"}])
    with pytest.raises(KeyError, match="missing column 'messages' .*or give 'prompt' and 'completion'"):
        datamodule(processor, path)


def test_other_columns_reach_the_batch(processor, tmp_path):
    rows = [
        {"images": [], "messages": [user("Say red."), assistant("red")], "weight": 0.5, "label": True},
        {"images": [], "prompt": "Say blue.", "completion": "blue", "weight": 2.0, "label": False},
    ]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    dm = datamodule(processor, path, val=path, batch_size=2)
    for split in ("train", "val"):
        batch = one_batch(dm, split)
        assert set(batch["columns"]) == {"weight", "label"}  # not the consumed ones
        assert batch["columns"]["weight"] == [rows[r]["weight"] for r in batch["rows"]]
        assert batch["columns"]["label"] == [rows[r]["label"] for r in batch["rows"]]
