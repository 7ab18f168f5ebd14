"""Tests for the synthetic shapes datasets: determinism, idempotence, row formats and verifiable answers."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lightning_vlm.data import synthetic
from lightning_vlm.data.synthetic import (
    ANSWERS,
    BACKGROUNDS,
    COLOURS,
    QUESTION_TEMPLATES,
    TASKS,
    corpus,
    main,
    make_example,
    write_synthetic,
    wrong_answer,
)

KINDS = ("sft", "pref", "prompt")
KEYS = {
    "sft": {"images", "messages", "task"},
    "pref": {"images", "prompt", "chosen", "rejected", "answer", "task"},
    "prompt": {"images", "prompt", "answer", "task"},
}
# question text -> (task, colour named in it or None)
QUESTIONS = {
    template.format(colour=colour): (task, colour if "{colour}" in template else None)
    for task, templates in QUESTION_TEMPLATES.items()
    for template in templates
    for colour in COLOURS
}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def text_of(message: dict) -> str:
    (text,) = [c["text"] for c in message["content"] if c["type"] == "text"]
    return text


def foreground(image: Image.Image) -> dict[tuple[int, int], tuple[int, int, int]]:
    """Pixels that differ from the (plain) background, which the corner pixel shows."""
    image = image.convert("RGB")
    background = image.getpixel((0, 0))
    assert background in BACKGROUNDS
    pixels, (w, h) = image.load(), image.size
    return {(x, y): pixels[x, y] for y in range(h) for x in range(w) if pixels[x, y] != background}


def components(points: set[tuple[int, int]]) -> list[set[tuple[int, int]]]:
    """4-connected components of a set of pixels, by flood fill."""
    left, found = set(points), []
    while left:
        stack, part = [left.pop()], set()
        while stack:
            x, y = stack.pop()
            part.add((x, y))
            for nb in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if nb in left:
                    left.remove(nb)
                    stack.append(nb)
        found.append(part)
    return found


def shape_of(part: set[tuple[int, int]]) -> str:
    """Classify one blob by how much of its bounding box it fills."""
    xs, ys = [x for x, _ in part], [y for _, y in part]
    fill = len(part) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    return "square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle"


def check_answer(images: list[Image.Image], question: str, answer: str) -> None:
    """Assert that ``answer`` to ``question`` is what the pixels of ``images`` show."""
    task, named = QUESTIONS[question]
    assert answer in ANSWERS[task]
    if task == "compare":
        assert len(images) == 2
        shown = [COLOURS[named] in set(foreground(image).values()) for image in images]
        assert shown == [answer == "first", answer == "second"]
        return
    assert len(images) == 1
    fg = foreground(images[0])
    parts = components(set(fg))
    w, h = images[0].size
    if task == "colour":
        assert Counter(fg.values()).most_common(1)[0][0] == COLOURS[answer]
        assert set(fg.values()) == {COLOURS[answer]}
    elif task == "count":
        assert len(parts) == int(answer)
    elif task == "shape":
        assert {shape_of(part) for part in parts} == {answer}
    else:
        assert len(parts) == 1
        cx, cy = (sum(p[0] for p in fg) / len(fg), sum(p[1] for p in fg) / len(fg))
        inside = {
            "left": cx < w / 3 and h * 0.3 < cy < h * 0.7,
            "right": cx > 2 * w / 3 and h * 0.3 < cy < h * 0.7,
            "top": cy < h / 3 and w * 0.3 < cx < w * 0.7,
            "bottom": cy > 2 * h / 3 and w * 0.3 < cx < w * 0.7,
        }
        assert [pos for pos, ok in inside.items() if ok] == [answer]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synthetic") / "data", n_train=60, n_val=20, seed=0)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(n_train=15, n_val=5, image_size=64)
    a = snapshot(write_synthetic(tmp_path / "a", seed=3, **kwargs))
    b = snapshot(write_synthetic(tmp_path / "b", seed=3, **kwargs))
    c = snapshot(write_synthetic(tmp_path / "c", seed=4, **kwargs))
    assert a == b
    assert sum(name.endswith(".png") for name in a) >= 20 and "pref_val.jsonl" in a
    for name in ("sft_train.jsonl", "pref_train.jsonl", "prompt_val.jsonl"):
        assert a[name] != c[name]
    assert any(a[name] != c.get(name) for name in a if name.endswith(".png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left


def test_idempotent_and_mismatch_raises(tmp_path: Path) -> None:
    out = tmp_path / "data"
    assert write_synthetic(out, n_train=5, n_val=2, image_size=48, seed=1) == out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert write_synthetic(str(out), n_train=5, n_val=2, image_size=48, seed=1) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(ValueError, match="seed") as info:
        write_synthetic(out, n_train=5, n_val=2, image_size=48, seed=2)
    assert str(out) in str(info.value) and "n_train" not in str(info.value)
    with pytest.raises(ValueError, match="n_train") as info:
        write_synthetic(out, n_train=6, n_val=2, image_size=48, seed=1)
    assert str(out) in str(info.value)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_failed_write_leaves_nothing_and_rerun_does_no_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = synthetic._write_split

    def fail_on_val(root: Path, split: str, *args) -> dict[str, int]:
        if split == "val":
            raise RuntimeError("disk full")
        return real(root, split, *args)

    monkeypatch.setattr(synthetic, "_write_split", fail_on_val)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic(tmp_path / "data", n_train=3, n_val=2, image_size=48)
    assert list(tmp_path.iterdir()) == []  # neither a half-written folder nor a temporary one
    monkeypatch.setattr(synthetic, "_write_split", real)
    write_synthetic(tmp_path / "data", n_train=3, n_val=2, image_size=48)
    monkeypatch.setattr(synthetic, "_write_split", fail_on_val)
    write_synthetic(tmp_path / "data", n_train=3, n_val=2, image_size=48)  # already there: nothing drawn
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_refuses_foreign_folder_but_fills_empty_one(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="full"):
        write_synthetic(tmp_path / "full", n_train=2, n_val=1, image_size=48)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    write_synthetic(tmp_path / "empty", n_train=2, n_val=1, image_size=48)
    assert (tmp_path / "empty" / "manifest.json").is_file()
    with pytest.raises(ValueError, match="tasks"):
        write_synthetic(tmp_path / "bad", n_train=2, n_val=1, tasks=("colour", "smell"))


def test_rows_have_documented_format(data_dir: Path) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["params"] == dict(n_train=60, n_val=20, image_size=112, seed=0, tasks=list(TASKS))
    for split, n in (("train", 60), ("val", 20)):
        rows = {kind: read_rows(data_dir / f"{kind}_{split}.jsonl") for kind in KINDS}
        for kind in KINDS:
            assert len(rows[kind]) == n == manifest["rows"][f"{kind}_{split}"]
            for row in rows[kind]:
                assert set(row) == KEYS[kind] and row["task"] in TASKS
                assert len(row["images"]) == (2 if row["task"] == "compare" else 1)
                for path in row["images"]:
                    assert not Path(path).is_absolute() and (data_dir / path).is_file()
                user_turns = row["messages"][::2] if kind == "sft" else row["prompt"]
                assert [t["role"] for t in user_turns] == ["user"] * len(user_turns)
                types = [c["type"] for c in user_turns[0]["content"]]
                assert types == ["image"] * len(row["images"]) + ["text"]  # images come before the text
                assert all(c["type"] == "text" for t in user_turns[1:] for c in t["content"])
        assert Counter(row["task"] for row in rows["sft"]) == {task: n // len(TASKS) for task in TASKS}
        for sft, pref, prompt in zip(rows["sft"], rows["pref"], rows["prompt"], strict=True):
            roles = [m["role"] for m in sft["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) in (2, 4)
            assert pref["prompt"] == prompt["prompt"] == sft["messages"][:1]
            assert pref["images"] == prompt["images"] == sft["images"]
            assert pref["answer"] == prompt["answer"] == text_of(sft["messages"][1])
            assert pref["chosen"] == [
                {"role": "assistant", "content": [{"type": "text", "text": pref["answer"]}]}
            ]
            assert [m["role"] for m in pref["rejected"]] == ["assistant"]
            assert text_of(pref["rejected"][0]) != pref["answer"]
            assert text_of(pref["rejected"][0]) in ANSWERS[pref["task"]]
        multi = sum(len(row["messages"]) == 4 for row in rows["sft"])
        assert (0 < multi <= n * 0.2) if split == "train" else multi == 0


def test_answers_are_verifiable_from_pixels(data_dir: Path) -> None:
    checked: Counter[str] = Counter()
    for split in ("train", "val"):
        for row in read_rows(data_dir / f"sft_{split}.jsonl"):
            images = [Image.open(data_dir / path) for path in row["images"]]
            messages = row["messages"]
            for user, assistant in zip(messages[::2], messages[1::2], strict=True):
                check_answer(images, text_of(user), text_of(assistant))
                checked[QUESTIONS[text_of(user)][0]] += 1
    assert set(checked) == set(TASKS) and min(checked.values()) >= 16


@pytest.mark.parametrize("task", TASKS)
def test_make_example_and_wrong_answer(task: str) -> None:
    answers = Counter()
    for seed in range(30):
        images, question, answer = make_example(random.Random(seed), task, 112)
        assert all(image.size == (112, 112) and image.mode == "RGB" for image in images)
        check_answer(images, question, answer)
        answers[answer] += 1
        again = make_example(random.Random(seed), task, 112)
        assert again[1:] == (question, answer) and [i.tobytes() for i in again[0]] == [
            i.tobytes() for i in images
        ]
        rng = random.Random(seed)
        wrong = {wrong_answer(rng, task, answer) for _ in range(20)}
        assert answer not in wrong and wrong <= set(ANSWERS[task])
    assert len(answers) >= min(3, len(ANSWERS[task]))  # answers vary
    with pytest.raises(ValueError):
        make_example(random.Random(0), "smell", 112)


def test_corpus_covers_every_written_string(data_dir: Path) -> None:
    vocab = corpus()
    assert len(vocab) == len(set(vocab))
    assert set(QUESTIONS) <= set(vocab)
    assert {a for answers in ANSWERS.values() for a in answers} <= set(vocab)
    written = set()
    for path in data_dir.glob("*.jsonl"):
        for row in read_rows(path):
            for key in ("messages", "prompt", "chosen", "rejected"):
                written |= {text_of(m) for m in row.get(key, [])}
            written |= {row["answer"]} if "answer" in row else set()
    assert len(written) > 20 and written <= set(vocab)


def test_cli_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    main(["--out", str(out), "--n-train", "4", "--n-val", "2", "--image-size", "48", "--seed", "7"])
    assert capsys.readouterr().out.strip() == str(out)
    params = json.loads((out / "manifest.json").read_text())["params"]
    assert params == dict(n_train=4, n_val=2, image_size=48, seed=7, tasks=list(TASKS))
    assert len(read_rows(out / "sft_train.jsonl")) == 4
