"""Preference data: chosen block then rejected block, public layouts (RLAIF-V, MMPR), multi-turn
prompts, bad rows named, missing columns, the synthetic pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_vlm import BackboneConfig, TinyVLM, VLMBackbone
from lightning_vlm.data.rows import BadRowError
from tests.helpers.preference import first_batch, pref_dm
from tests.helpers.processing import count_image_processing


@pytest.fixture(scope="module")
def backbone():
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM()))
    bb.load()
    return bb


def test_batch_is_chosen_block_then_rejected_block_with_completion_labels(backbone, synthetic_dir):
    dm = pref_dm(backbone.processor, synthetic_dir / "pref_train.jsonl")
    batch = first_batch(dm)
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

    per_seq = first_batch(pref_dm(backbone.processor, synthetic_dir / "pref_train.jsonl", vision_once=False))
    assert per_seq["copies"] == 1
    assert per_seq["vision"]["image_grid_thw"].shape[0] == 2 * batch["vision"]["image_grid_thw"].shape[0]
    assert torch.equal(per_seq["labels_mask"].sum(-1), batch["labels_mask"].sum(-1))


def test_each_image_is_processed_once_per_pair(backbone, synthetic_dir, monkeypatch):
    per_seq = first_batch(pref_dm(backbone.processor, synthetic_dir / "pref_train.jsonl", vision_once=False))
    processed = count_image_processing(monkeypatch, backbone.processor)
    batch = first_batch(pref_dm(backbone.processor, synthetic_dir / "pref_train.jsonl"))
    n = batch["vision"]["image_grid_thw"].shape[0]
    assert processed == [n]  # not once for the chosen block and again for the rejected one
    # The same batch as processing every sequence's own copy of the images.
    for key in ("input_ids", "attention_mask", "labels_mask"):
        assert torch.equal(batch[key], per_seq[key]), key
    assert torch.equal(batch["vision"]["mm_token_type_ids"], per_seq["vision"]["mm_token_type_ids"])
    for key in ("pixel_values", "image_grid_thw"):
        assert torch.equal(torch.cat([batch["vision"][key]] * 2), per_seq["vision"][key]), key


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
    want = first_batch(pref_dm(backbone.processor, ours))
    for source in (rlaif, mmpr):
        got = first_batch(pref_dm(backbone.processor, source, columns=columns))
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
    batch = first_batch(pref_dm(backbone.processor, source))
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
        ({"margin": "big"}, {"margin": 1.0}, "row 0: field 'margin': expected a number"),
        ({"chosen": []}, {"chosen": _GOOD_REPLY}, "row 0: field 'chosen': expected a non-empty list"),
        ({"chosen": ""}, {}, "row 0: field 'chosen': message 0, the assistant's reply, is empty"),
        ({"rejected": " "}, {}, "row 0: field 'rejected': message 0, the assistant's reply, is empty"),
    ],
    ids=["markers", "chosen-role", "image-in-response", "margin", "empty", "empty-chosen", "blank-rejected"],
)
def test_bad_rows_are_named(row, fixed, message, backbone, tmp_path):
    good = {"image": _image(tmp_path), "question": "What?", "chosen": "red", "rejected": "blue"}
    columns = {"images": "image", "prompt": "question"}
    source = _write(tmp_path / "bad.jsonl", [{**good, **row}])
    with pytest.raises(BadRowError, match=message):
        pref_dm(backbone.processor, source, columns=columns)
    # skipped and counted, also when the two rows' types differ (Arrow stores such a column as JSON)
    both = _write(tmp_path / "both.jsonl", [{**good, **row}, {**good, **fixed}])
    dm = pref_dm(backbone.processor, both, columns=columns, bad_rows="skip")
    assert len(dm.datasets["train"]) == 1 and dm.skipped[str(both)] == {"bad": 1}


def test_missing_column_names_the_mapping(backbone, tmp_path):
    source = _write(
        tmp_path / "r.jsonl", [{"image": _image(tmp_path), "question": "q", "chosen": "a", "rejected": "b"}]
    )
    with pytest.raises(KeyError, match="missing column 'prompt' .*map it with data.columns"):
        pref_dm(backbone.processor, source, columns={"images": "image"})


def test_synthetic_pairs_prefer_the_correct_answer(synthetic_dir):
    rows = [json.loads(line) for line in (synthetic_dir / "pref_val.jsonl").read_text().splitlines()]
    assert rows and all(r["chosen"][0]["content"][0]["text"] == r["answer"] for r in rows)
    assert all(r["rejected"][0]["content"][0]["text"] != r["answer"] for r in rows)


def test_other_columns_reach_the_batch(backbone, tmp_path):
    good = {
        "images": [_image(tmp_path)],
        "prompt": "What?",
        "chosen": "red",
        "rejected": "blue",
        "margin": 1.0,
    }
    source = _write(
        tmp_path / "c.jsonl",
        [{**good, "weight": 0.5, "task": "colour"}, {**good, "weight": 2.0, "task": "x"}],
    )
    batch = first_batch(pref_dm(backbone.processor, source, batch_size=2))
    assert batch["columns"] == {"weight": [0.5, 2.0], "task": ["colour", "x"]}  # margin, prompt, ... consumed
