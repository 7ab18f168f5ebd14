"""Deterministic synthetic image-question data (PIL shapes) with one-word answers checkable from pixels."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 50, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (230, 230, 230))
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
COUNTS: tuple[int, ...] = (1, 2, 3, 4)
TASKS: tuple[str, ...] = ("colour", "shape", "count", "position", "compare")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(n) for n in COUNTS),
    "position": POSITIONS,
    "compare": ("first", "second"),
}
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "Which colour is the shape?", "Name the colour of the shape."),
    "shape": ("What shape is in the image?", "Which shape is shown?", "Name the shape in the picture."),
    "count": ("How many shapes are there?", "How many shapes can you see?", "Count the shapes in the image."),
    "position": ("Where is the shape?", "Which side is the shape on?", "Where is the shape drawn?"),
    "compare": (
        "Which image shows the {colour} shape, the first or the second?",
        "Is the {colour} shape in the first or the second image?",
        "Which picture contains the {colour} shape: first or second?",
    ),
}
_NEAR, _MID, _FAR = (0.15, 0.27), (0.38, 0.62), (0.73, 0.85)  # position boxes, (x0, x1, y0, y1)
POSITION_BOXES = {"left": _NEAR + _MID, "right": _FAR + _MID, "top": _MID + _NEAR, "bottom": _MID + _FAR}


def corpus() -> list[str]:
    """Every question (templates filled with each colour) and answer string, for training a tokenizer."""
    questions = [
        template.format(colour=colour)
        for templates in QUESTION_TEMPLATES.values()
        for template in templates
        for colour in (COLOURS if "{colour}" in template else [""])
    ]
    return list(dict.fromkeys(questions + [a for answers in ANSWERS.values() for a in answers]))


def wrong_answer(rng: random.Random, task: str, answer: str) -> str:
    """Draw a plausible wrong answer of the same task (for preference pairs)."""
    return rng.choice([a for a in ANSWERS[task] if a != answer])


def _picture(rng: random.Random, size: int, colour: str, shape: str, centres: list, r: int) -> Image.Image:
    """An RGB image on a plain light background with one shape (inside radius ``r``) at each centre."""
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw, fill = ImageDraw.Draw(image), COLOURS[colour]
    for cx, cy in centres:
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            draw.rectangle((cx - r * 4 // 5, cy - r * 4 // 5, cx + r * 4 // 5, cy + r * 4 // 5), fill=fill)
        else:  # equilateral triangle pointing up, centroid at (cx, cy)
            d = r * 7 // 8
            draw.polygon([(cx, cy - r), (cx - d, cy + r // 2), (cx + d, cy + r // 2)], fill=fill)
    return image


def _one(rng: random.Random, size: int, colour: str, shape: str, box: tuple, radius: tuple) -> Image.Image:
    """One shape, centre drawn from ``box`` (x0, x1, y0, y1) and radius from ``radius``, as fractions."""
    centre = (round(size * rng.uniform(box[0], box[1])), round(size * rng.uniform(box[2], box[3])))
    return _picture(rng, size, colour, shape, [centre], max(3, round(size * rng.uniform(*radius))))


def _scatter(rng: random.Random, n: int, size: int) -> tuple[list[tuple[int, int]], int]:
    """Centres for ``n`` shapes at least a few pixels apart, by rejection sampling with bounded tries."""
    r = max(3, round(size * rng.uniform(0.09, 0.12)))
    while True:
        centres: list[tuple[int, int]] = []
        for _ in range(300):
            c = (rng.randint(r + 2, size - r - 3), rng.randint(r + 2, size - r - 3))
            if all((c[0] - x) ** 2 + (c[1] - y) ** 2 > (2 * r + 4) ** 2 for x, y in centres):
                centres.append(c)
                if len(centres) == n:
                    return centres, r
        r = max(2, r - 1)  # too crowded: retry with smaller shapes


def _example(rng: random.Random, task: str, size: int) -> tuple[list[Image.Image], list[tuple]]:
    """Draw the images and the facts (task, answer, colour asked about) on them, ``task``'s fact first."""
    if task not in TASKS or size < 32:
        raise ValueError(f"need a task in {TASKS} and image_size >= 32, got {task!r} and {size}")
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    middle, big = (0.4, 0.6, 0.4, 0.6), (0.11, 0.19)
    if task == "compare":
        other = rng.choice([c for c in COLOURS if c != colour])
        pair = [colour, other] if rng.random() < 0.5 else [other, colour]
        images = [_one(rng, size, c, rng.choice(SHAPES), middle, big) for c in pair]
        return images, [("compare", ("first", "second")[pair.index(c)], c) for c in (colour, other)]
    facts = {"colour": colour, "shape": shape, "count": "1"}
    if task == "count":
        facts["count"] = str(rng.choice(COUNTS))
        image = _picture(rng, size, colour, shape, *_scatter(rng, int(facts["count"]), size))
    elif task == "position":
        facts["position"] = rng.choice(POSITIONS)
        image = _one(rng, size, colour, shape, POSITION_BOXES[facts["position"]], (0.1, 0.13))
    else:
        image = _one(rng, size, colour, shape, middle, big)
    return [image], [(task, facts.pop(task), "")] + [(t, a, "") for t, a in facts.items()]


def _ask(rng: random.Random, task: str, colour: str = "") -> str:
    return rng.choice(QUESTION_TEMPLATES[task]).format(colour=colour)


def make_example(rng: random.Random, task: str, image_size: int) -> tuple[list[Image.Image], str, str]:
    """Draw one example of ``task`` (one of ``TASKS``) as a pure function of ``rng``'s state, on square RGB
    images of side ``image_size`` (at least 32): ``(images, question, answer)``, with two images for
    "compare" and one otherwise, and a one-word answer."""
    images, facts = _example(rng, task, image_size)
    return images, _ask(rng, task, facts[0][2]), facts[0][1]


def _turn(role: str, text: str, n_images: int = 0) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def _write_split(root: Path, split: str, n: int, size: int, seed: int, tasks: list[str]) -> dict[str, int]:
    """Write the images and the three jsonl files of one split under ``root``; return their row counts."""
    order_rng = random.Random(f"{seed}-{split}-order")  # shuffled blocks of all tasks: even shares
    order = [t for _ in range(-(-n // len(tasks))) for t in order_rng.sample(tasks, len(tasks))][:n]
    rows: dict[str, list[dict[str, Any]]] = {"sft": [], "pref": [], "prompt": []}
    for index, task in enumerate(order):
        rng = random.Random(f"{seed}-{split}-{index}")
        images, facts = _example(rng, task, size)
        paths = [f"images/{split}_{index}_{k}.png" for k in range(len(images))]
        for image, path in zip(images, paths, strict=True):
            image.save(root / path)
        answer, tail = facts[0][1], {"answer": facts[0][1], "task": task}
        user = _turn("user", _ask(rng, task, facts[0][2]), len(images))
        messages = [user, _turn("assistant", answer)]
        if split == "train" and index % 10 == 9:  # 10%: ask a follow-up question
            follow = rng.choice(facts[1:])
            messages += [_turn("user", _ask(rng, follow[0], follow[2])), _turn("assistant", follow[1])]
        rows["sft"].append({"images": paths, "messages": messages, "task": task})
        chosen, rejected = _turn("assistant", answer), _turn("assistant", wrong_answer(rng, task, answer))
        pref = {"images": paths, "prompt": [user], "chosen": [chosen], "rejected": [rejected]}
        rows["pref"].append({**pref, **tail})
        rows["prompt"].append({"images": paths, "prompt": [user], **tail})
    for kind, kind_rows in rows.items():
        (root / f"{kind}_{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kind_rows))
    return {f"{kind}_{split}": len(kind_rows) for kind, kind_rows in rows.items()}


def _already_written(out_dir: Path, params: dict[str, Any]) -> bool:
    """True if ``out_dir`` holds data made with ``params``; raise if it holds anything else."""
    if not (out_dir / "manifest.json").is_file():
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise ValueError(f"{out_dir} is not empty and has no manifest.json; refusing to overwrite it")
        return False
    old = json.loads((out_dir / "manifest.json").read_text()).get("params", {})
    if old == params:
        return True
    keys = [k for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k)]
    diff = "; ".join(f"{k}: {old.get(k)!r} in the folder, {params.get(k)!r} requested" for k in keys)
    raise ValueError(f"{out_dir} holds synthetic data made with other parameters ({diff}); delete it first")


def write_synthetic(
    out_dir: str | os.PathLike,
    n_train: int = 2000,
    n_val: int = 200,
    image_size: int = 112,
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
) -> Path:
    """Write the synthetic SFT, preference and prompt datasets under ``out_dir`` and return it as a Path.

    The output is a pure function of the arguments, built in a temporary sibling folder and renamed into
    place; if ``out_dir`` already holds data made with the same parameters, nothing is rewritten. Raises
    ValueError if a task is unknown or ``out_dir`` holds other data (the message lists the differences).

    Args:
        out_dir: Destination folder; it must be missing, empty or hold a previous run's data.
        n_train: Rows in each train file (every 10th SFT train row is a two-turn conversation).
        n_val: Rows in each val file.
        image_size: Side of the square images in pixels.
        seed: Seed for everything drawn.
        tasks: Members of ``TASKS`` to use; rows are spread evenly over them.
    """
    out_dir = Path(out_dir)
    params = dict(n_train=n_train, n_val=n_val, image_size=image_size, seed=seed, tasks=list(tasks))
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty selection of {TASKS}, got {tasks!r}")
    if _already_written(out_dir, params):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        rows = {**_write_split(tmp, "train", n_train, image_size, seed, list(tasks))}
        rows.update(_write_split(tmp, "val", n_val, image_size, seed, list(tasks)))
        (tmp / "manifest.json").write_text(json.dumps({"params": params, "rows": rows}, indent=2) + "\n")
        try:
            os.rename(tmp, out_dir)  # atomic; replaces an empty folder
        except OSError:
            if not _already_written(out_dir, params):  # another process may have finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m lightning_vlm.data.synthetic --out DIR [--n-train N ...]``; prints the folder."""
    parser = argparse.ArgumentParser(description="Write the synthetic shapes datasets.")
    parser.add_argument("--out", type=Path, required=True, help="destination folder")
    for flag, default in (("--n-train", 2000), ("--n-val", 200), ("--image-size", 112), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    args = parser.parse_args(argv)
    print(write_synthetic(args.out, args.n_train, args.n_val, args.image_size, args.seed, args.tasks))


if __name__ == "__main__":
    main()
