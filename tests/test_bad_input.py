"""Bad input through the command line: each data problem, run as ``lightning-vlm fit`` in-process on a tiny
model, stops with an error that names the file, the row (or line) and the field, is skipped and counted
under ``bad_rows: skip``, or trains. Data problems are caught at set-up, before the model trains (an
image left unchecked fails in the first batch, a junk reward in the first rollout), so every case is
cheap; the working ones run one step. A reward error names the function and the sample, not a file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml

from lightning_vlm.cli import VLMCLI
from tests.helpers.sft_data import assistant, draw, noisy_png, user

KINDS = {
    "sft": ("lightning_vlm.objectives.SFT", "lightning_vlm.data.SFTDataModule"),
    "dpo": ("lightning_vlm.objectives.DPO", "lightning_vlm.data.PreferenceDataModule"),
    "grpo": ("lightning_vlm.objectives.GRPO", "lightning_vlm.data.PromptDataModule"),
}
IMG, MISSING, GARBAGE, TRUNCATED = "img/good.png", "img/nowhere.png", "img/garbage.png", "img/truncated.png"

SFT = {"images": [IMG], "messages": [user("Colour?", 1), assistant("red")]}
PAIR = {"images": [IMG], "prompt": "<image>Colour?", "chosen": "red", "rejected": "blue"}
PROMPT = {"images": [IMG], "prompt": "<image>Colour?", "answer": "red"}


# ---------------------------------------------------------------- junk rewards (by import path)
def reward_text(prompts, completions, **row):
    return ["high"] * len(completions)


def reward_short(prompts, completions, **row):
    return [1.0]


def reward_nan(prompts, completions, **row):
    return [float("nan")] * len(completions)


def reward_raises(prompts, completions, answer, **row):
    return [float(a) for a in answer]  # "red" is no number


# ---------------------------------------------------------------- the cases
@dataclass
class Case:
    """``expect``: ``(exception, regex)`` where ``FILE`` stands for the data file's path; ``{"bad": n}``,
    the counts of a run that skips; or None for a run that trains."""

    id: str
    kind: str
    content: Any  # rows, raw bytes, or a callable(folder) -> path
    expect: Any
    name: str = "t.jsonl"  # the data file's name; its suffix picks the format
    data: dict = field(default_factory=dict)  # more data.init_args
    reward: str | None = None  # a reward function of this module


def err(regex: str, exc: type[Exception] = ValueError) -> tuple:
    return exc, regex


def sft(*messages: dict, **changes) -> dict:
    """The good SFT row with other messages and/or fields."""
    return {**SFT, **({"messages": list(messages)} if messages else {}), **changes}


def _bad(row: dict, **changes) -> dict:
    return {**row, **changes}


def _unicode(encoding: str, text: str) -> bytes:
    """A good SFT row and one whose reply is ``text``, as JSON lines in ``encoding``."""
    rows = [json.dumps(SFT), json.dumps(sft(user("Colour?", 1), assistant(text)), ensure_ascii=False)]
    return "".join(r + "\n" for r in rows).encode(encoding)


def _zero_row_parquet(folder: Path) -> Path:
    path = folder / "zero.parquet"
    datasets.Dataset.from_list([SFT]).select([]).to_parquet(str(path))
    return path


def _saved(folder: Path) -> Path:
    path = folder / "saved"
    good = sft(images=[str(folder / IMG)])  # relative paths resolve against the saved folder
    datasets.Dataset.from_list([good, sft(images=[MISSING])]).save_to_disk(str(path))
    return path


LINE = json.dumps(SFT).encode()
ASK = user("Colour?", 1)
R1 = r"FILE: row 1: "
SKIP, UNCHECKED = {"bad_rows": "skip"}, {"check_images": False}
CASES = [
    # images
    Case("image-missing", "sft", [SFT, sft(images=[MISSING])],
         err(R1 + r"field 'images': cannot read image 'img/nowhere\.png'")),
    Case("image-truncated", "sft", [SFT, sft(images=[TRUNCATED])],
         err(R1 + r"field 'images': cannot read image 'img/truncated\.png'.*truncated")),
    Case("image-not-an-image", "sft", [SFT, sft(images=[GARBAGE])],
         err(R1 + r"field 'images': cannot read image 'img/garbage\.png'")),
    Case("image-truncated-unchecked", "sft", [SFT, sft(images=[TRUNCATED])],  # fails when collated
         err(R1 + r"field 'images': cannot read image 'img/truncated\.png'"), data=UNCHECKED),
    Case("image-truncated-unchecked-dpo-reference", "dpo", [PAIR, _bad(PAIR, images=[TRUNCATED])],
         err(R1 + r"field 'images': cannot read image 'img/truncated\.png'"), data=UNCHECKED),
    Case("image-skipped", "sft", [SFT, sft(images=[GARBAGE]), SFT], {"bad": 1}, data=SKIP),
    Case("placeholders-more", "sft", [SFT, sft(user("Colour?", 2), assistant("red"))],
         err(R1 + r"field 'messages' has 2 image placeholder\(s\) but 'images' lists 1")),
    Case("placeholders-fewer-skipped", "sft", [SFT, sft(images=[IMG, IMG])], {"bad": 1}, data=SKIP),
    Case("markers-prompt", "grpo", [PROMPT, _bad(PROMPT, prompt="<image><image>Colour?")],
         err(R1 + r"field 'prompt' has 2 <image> marker\(s\) but 'images' lists 1")),
    Case("image-in-response", "dpo",
         [PAIR, _bad(PAIR, chosen=[{"role": "assistant", "content": [{"type": "image"}]}])],
         err(R1 + r"field 'chosen': images belong in the prompt")),
    # rows: missing fields, wrong types, empty replies
    Case("row-without-messages", "sft", [SFT, {"images": [IMG]}],
         err(R1 + r"field 'messages': expected a non-empty list of messages")),
    Case("row-without-images", "sft", [SFT, {"messages": SFT["messages"]}],
         err(R1 + r"field 'messages' has 1 image placeholder\(s\) but 'images' lists 0")),
    Case("message-without-role", "sft", [SFT, sft(ASK, {"content": "red"})],
         err(R1 + r"field 'messages': message 1 needs a 'role' string and 'content'")),
    Case("role-a-number", "sft", [SFT, sft({**ASK, "role": 1}, assistant("red"))],
         err(R1 + r"field 'messages': message 0 needs a 'role' string")),
    Case("content-a-number", "sft", [SFT, sft(ASK, {"role": "assistant", "content": 5})],
         err(R1 + r"field 'messages': message 1 content must be a string or a list")),
    Case("text-a-number", "sft",
         [SFT, sft(ASK, {"role": "assistant", "content": [{"type": "text", "text": 7}]})],
         err(R1 + r"field 'messages': message 1 has a bad part \{'type': 'text', 'text': 7\}")),
    Case("last-not-assistant", "sft", [SFT, sft(ASK)],
         err(R1 + r"field 'messages': the last message must be the assistant's reply")),
    Case("empty-reply", "sft", [SFT, sft(ASK, assistant(""))],
         err(R1 + r"field 'messages': message 1, the assistant's reply, is empty")),
    Case("empty-reply-skipped", "sft", [SFT, sft(ASK, assistant(" ")), SFT], {"bad": 1}, data=SKIP),
    Case("empty-chosen", "dpo", [PAIR, _bad(PAIR, chosen="")],
         err(R1 + r"field 'chosen': message 0, the assistant's reply, is empty")),
    Case("empty-rejected-skipped", "dpo", [PAIR, _bad(PAIR, rejected=[assistant("")]), PAIR], {"bad": 1},
         data=SKIP),
    Case("row-without-rejected", "dpo", [PAIR, {k: v for k, v in PAIR.items() if k != "rejected"}],
         err(R1 + r"field 'rejected': expected a non-empty list of messages")),
    Case("margin-text", "dpo", [_bad(PAIR, margin=1.0), _bad(PAIR, margin="big")],
         err(R1 + r"field 'margin': expected a number, got 'big'")),
    Case("prompt-a-number", "grpo", [PROMPT, _bad(PROMPT, prompt=5)],
         err(R1 + r"field 'prompt': expected a non-empty list of messages")),
    Case("prompt-ends-with-reply", "grpo", [PROMPT, _bad(PROMPT, prompt=[ASK, assistant("red")])],
         err(R1 + r"field 'prompt': the last message must be the user's")),
    Case("answers-of-varied-types", "grpo",
         [PROMPT, _bad(PROMPT, answer=3), _bad(PROMPT, answer=2.5), _bad(PROMPT, answer=None)], None),
    Case("prompts-string-and-list", "grpo",
         [PROMPT, _bad(PROMPT, prompt=[ASK]), _bad(PROMPT, images=IMG)], None),
    Case("overlong", "sft", [SFT, SFT], err(r"FILE: row 0: \d+ tokens > max_length 8"),
         data={"max_length": 8}),
    Case("all-rows-bad-skipped", "sft", [sft(images=[MISSING])] * 2,
         err(r"FILE: no usable rows left after checks \(\{'bad': 2\}\)"), data=SKIP),
    # lines of JSON
    Case("invalid-json-line", "sft", LINE + b'\n{"images": [,\n',
         err(r"FILE: line 2 is not valid JSON")),
    Case("line-not-an-object", "sft", LINE + b"\n[1, 2]\n", err(r"FILE: line 2 is not a JSON object")),
    Case("blank-lines", "sft", b"\n" + LINE + b"\n\n  \n" + LINE, None),
    Case("json-list", "sft", [SFT, SFT], None, name="t.json"),
    Case("json-list-invalid", "sft", b"[\n" + LINE + b",\n {]\n", err(r"FILE: line 3 is not valid JSON"),
         name="t.json"),
    # columns
    Case("missing-column", "sft", [{"images": [IMG], "conversation": SFT["messages"]}],
         err(r"FILE: missing column 'messages'", KeyError)),
    Case("mapped-columns", "sft", [{"pics": [IMG], "conversation": SFT["messages"]}] * 2, None,
         data={"columns": {"messages": "conversation", "images": "pics"}}),
    Case("mapping-to-absent-column", "dpo", [PAIR], err(r"FILE: column mapping names 'question'", KeyError),
         data={"columns": {"prompt": "question"}}),
    # encodings
    Case("latin-1", "sft", _unicode("latin-1", "Café"), err(r"FILE: line 2 is not UTF-8")),
    Case("utf-16", "sft", _unicode("utf-16", "red"), err(r"FILE: line 1 is not UTF-8")),
    Case("utf-8-byte-order-mark", "sft", b"\xef\xbb\xbf" + _unicode("utf-8", "red"), None),
    Case("line-separator-in-text", "sft", _unicode("utf-8", "red\u2028green"), None),
    # empty and missing files, other formats
    Case("empty-file", "sft", b"", err(r"FILE: holds no rows")),
    Case("blank-file", "dpo", b"\n \n", err(r"FILE: holds no rows")),
    Case("missing-file", "sft", lambda folder: folder / "absent.jsonl",
         err(r"dataset file not found: FILE", FileNotFoundError)),
    Case("parquet", "sft", [SFT, SFT], None, name="t.parquet"),
    Case("parquet-bad-row-skipped", "dpo", [PAIR, _bad(PAIR, images=[MISSING]), PAIR], {"bad": 1},
         name="t.parquet", data=SKIP),
    Case("parquet-missing-column", "grpo", [{"images": [IMG], "question": "Colour?"}],
         err(r"FILE: missing column 'prompt'", KeyError), name="t.parquet"),
    Case("parquet-empty-file", "sft", b"", err(r"FILE: unreadable parquet \(empty or damaged\?\)"),
         name="t.parquet"),
    Case("parquet-zero-rows", "sft", _zero_row_parquet, err(r"FILE: unreadable parquet"),
         name="zero.parquet"),
    Case("arrow-damaged", "sft", b"not an arrow file" * 4, err(r"FILE: unreadable arrow"), name="t.arrow"),
    Case("saved-folder-bad-row", "sft", _saved,
         err(R1 + r"field 'images': cannot read image 'img/nowhere\.png'"), name="saved"),
    Case("csv", "grpo", b"prompt,images,answer\nColour?,img/good.png,red\n",
         err(r"FILE: unknown file type; data files end in \.jsonl, \.json, \.parquet, \.arrow"),
         name="t.csv"),
    # rewards that return junk, on prompt data
    Case("reward-text", "grpo", [PROMPT, PROMPT],
         err(r"reward_text returned 'high' \(a str, not a number or None\) for sample 0", RuntimeError),
         reward="reward_text"),
    Case("reward-too-few", "grpo", [PROMPT, PROMPT],
         err(r"reward_short returned 1 values for 4 completions", RuntimeError), reward="reward_short"),
    Case("reward-nan", "grpo", [PROMPT, PROMPT], err(r"reward_nan returned nan for sample 0", RuntimeError),
         reward="reward_nan"),
    Case("reward-raises", "grpo", [PROMPT, PROMPT],
         err(r"reward_raises raised on this batch of 4 completions, at sample 0", RuntimeError),
         reward="reward_raises"),
]  # fmt: skip


# ---------------------------------------------------------------- running a case
@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A data folder with a good image, a file that is no image, and a truncated PNG."""
    img = tmp_path / "img"
    draw(img / "good.png", (32, 32), (220, 30, 30))
    (img / "garbage.png").write_bytes(b"this is not a png\n" * 20)
    raw = noisy_png(img / "noisy.png")
    (img / "truncated.png").write_bytes(raw[: len(raw) // 2])
    return tmp_path


def write(folder: Path, case: Case) -> Path:
    if callable(case.content):
        return case.content(folder)
    path = folder / case.name
    if isinstance(case.content, bytes):
        path.write_bytes(case.content)
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(case.content).to_parquet(str(path))
    elif path.suffix == ".json":
        path.write_text(json.dumps(case.content))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in case.content))
    return path


def fit(folder: Path, case: Case, train: Path) -> VLMCLI:
    """``lightning-vlm fit`` for one step of a tiny model, on ``train``."""
    model, data = KINDS[case.kind]
    callbacks = []
    if case.kind == "grpo":
        reward = f"{__name__}.{case.reward}" if case.reward else "lightning_vlm.rollout.rewards.accuracy"
        rollout = {"num_generations": 2, "max_new_tokens": 2, "rewards": [reward], "table_every_n_steps": 99}
        callbacks = [{"class_path": "lightning_vlm.rollout.RolloutCallback", "init_args": rollout}]
    # DPO scans its data for the reference log-probs before training: a second reader of the rows
    init = {"precompute_ref_logps": True} if case.kind == "dpo" else {}
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "logger": False,
                    "callbacks": callbacks, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(folder / "run")},
        "model": {"class_path": model,
                  "init_args": {"backbone": {"tiny": {"hidden_size": 64, "num_layers": 1}}, **init}},
        "data": {"class_path": data, "init_args": {"train": str(train), "batch_size": 4, **case.data}},
    }  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return VLMCLI(args=["fit", "--config", str(folder / "config.yaml")])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_named_skipped_or_trains(case: Case, folder: Path):
    train = write(folder, case)
    if isinstance(case.expect, tuple):
        exc, regex = case.expect
        with pytest.raises(exc, match=regex.replace("FILE", re.escape(str(train)))):
            fit(folder, case, train)
        return
    cli = fit(folder, case, train)
    assert cli.trainer.global_step == 1
    assert cli.datamodule.skipped[str(train)] == (case.expect or {})


def test_the_corpus_covers_each_kind_of_problem():
    assert len(CASES) >= 24 and len({c.id for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} == set(KINDS)
    assert {Path(c.name).suffix for c in CASES} >= {".jsonl", ".json", ".parquet", ".arrow", ".csv"}
    assert sum(c.expect is None for c in CASES) >= 5 and sum(isinstance(c.expect, dict) for c in CASES) >= 4
