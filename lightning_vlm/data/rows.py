"""Reading dataset rows: sources, column mappings, images, and the checks every row passes.

Every error names the source, the row index and the field. Rows keep their original index in
the ``__row`` column so that errors raised later (in DataLoader workers) can name them too.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

ROW = "__row"
BASE = "__base"
FILE_TYPES = (".jsonl", ".json", ".parquet", ".arrow")


class BadRowError(ValueError):
    """A dataset row that cannot be used; the message names the row and field."""


def load_source(source: str, columns: dict[str, str], required: tuple[str, ...]):
    """Load a local jsonl/json/parquet/arrow file, a ``save_to_disk`` folder, or ``hub/name:split``.

    Columns are renamed by ``columns`` (ours -> theirs, e.g. ``{"images": "image"}``) and each
    required column must exist. Returns a ``datasets.Dataset`` with ``__row`` and ``__base``
    (the folder that relative image paths are resolved against).
    """
    import datasets

    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        ds, base = datasets.load_from_disk(str(path)), str(path)
    elif suffix in FILE_TYPES or path.is_file():  # another existing file is refused, not sought on a hub
        ds, base = read_file(path, source), str(path.parent.resolve())
    else:
        name, _, split = source.partition(":")
        ds, base = datasets.load_dataset(name, split=split or "train"), "."
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{source}: holds several splits {list(ds)}; point at one")
    if len(ds) == 0:
        raise ValueError(f"{source}: holds no rows")
    renames = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    for theirs in renames:
        if theirs not in ds.column_names:
            raise KeyError(
                f"{source}: column mapping names {theirs!r}, but the columns are {ds.column_names}"
            )
    ds = ds.rename_columns(renames)
    for col in required:
        if col not in ds.column_names:
            hint = f"map it with data.columns, e.g. {{{col}: <their name>}}"
            raise KeyError(f"{source}: missing column {col!r} ({hint}); the columns are {ds.column_names}")
    ds = ds.add_column(ROW, list(range(len(ds))))
    return ds.add_column(BASE, [base] * len(ds))


def read_file(path: Path, source: str):
    """A data file as a ``datasets.Dataset``; errors name the file."""
    import datasets

    kind = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {source}")
    if kind in (".jsonl", ".json"):
        rows = read_json_rows(path)
        table = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}  # all keys
        try:
            return datasets.Dataset.from_dict(table)
        except pa.ArrowException:  # types vary across rows (a number among strings, ...): keep each as JSON
            return datasets.Dataset.from_dict(table, on_mixed_types="use_json")
    if kind not in FILE_TYPES:
        raise ValueError(f"{source}: unknown file type; data files end in {', '.join(FILE_TYPES)}")
    try:
        return datasets.load_dataset(kind[1:], data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - pyarrow's errors do not name the file
        raise ValueError(
            f"{source}: unreadable {kind[1:]} (empty or damaged?): {err.__cause__ or err}"
        ) from err


def read_json_rows(path: Path) -> list[dict]:
    """Read a .jsonl (or a .json list) and give every chat message list-of-parts content.

    Arrow needs one type per column; a file mixing ``"content": "2"`` and ``"content": [parts]``
    would otherwise need a JSON column for it. Errors name the file and the line.
    """
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is fine
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise BadRowError(f"{path}: line {line} is not UTF-8 ({err.reason}); save it as UTF-8") from err
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        items = [(f"item {k}", row) for k, row in enumerate(_loads(text, path))]
    else:  # newlines only: a JSON string may hold other line breaks (U+2028, ...)
        lines = enumerate(text.split("\n"), 1)
        items = [(f"line {n}", _loads(line, path, n)) for n, line in lines if line.strip()]
    for where, row in items:
        if not isinstance(row, dict):
            raise BadRowError(f"{path}: {where} is not a JSON object: {row!r:.80}")
        for key, v in row.items():
            if isinstance(v, list) and v and all(isinstance(m, dict) and "content" in m for m in v):
                row[key] = [_parts(m) for m in v]
    return [row for _, row in items]


def _loads(text: str, path: Path, line: int = 0) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRowError(f"{path}: line {line or err.lineno} is not valid JSON: {err.msg}") from err


def _parts(message: dict) -> dict:
    content = message["content"]
    if isinstance(content, str):
        return {**message, "content": [{"type": "text", "text": content}]}
    return message


def as_list(images: Any) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def open_image(ref: Any, base: str, row: int, decode: bool = True) -> Image.Image:
    """Open one image reference (path, ``{"bytes", "path"}`` dict, raw bytes or PIL image).

    With ``decode`` the pixels are read and converted to RGB (truncated files fail here);
    without, only the header is read (enough for the size).
    """
    try:
        if isinstance(ref, Image.Image):
            img = ref
        elif isinstance(ref, dict) and ref.get("bytes"):
            img = Image.open(io.BytesIO(ref["bytes"]))
        elif isinstance(ref, (bytes, bytearray)):
            img = Image.open(io.BytesIO(ref))
        else:
            path = ref.get("path") if isinstance(ref, dict) else ref
            if not isinstance(path, str):
                raise BadRowError(
                    f"row {row}: field 'images': expected a path, bytes or image, got {type(ref).__name__}"
                )
            img = Image.open(Path(base) / path)
        if not decode:
            return img
        img.load()
        return img.convert("RGB")
    except BadRowError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types; re-raise with the row named
        where = ref if isinstance(ref, str) else (ref.get("path") if isinstance(ref, dict) else "<bytes>")
        raise BadRowError(f"row {row}: field 'images': cannot read image {where!r}: {err}") from err


def count_image_parts(messages: Any, row: int, field: str) -> int:
    """Check the chat ``messages`` layout and count ``{"type": "image"}`` parts in it."""
    if not isinstance(messages, list) or not messages:
        raise BadRowError(f"row {row}: field {field!r}: expected a non-empty list of messages")
    n = 0
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or msg.get("content") is None:
            raise BadRowError(f"row {row}: field {field!r}: message {k} needs a 'role' string and 'content'")
        content = msg["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRowError(f"row {row}: field {field!r}: message {k} content must be a string or a list")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                n += 1
            elif kind != "text" or not isinstance(part.get("text"), str):
                raise BadRowError(f"row {row}: field {field!r}: message {k} has a bad part {part!r}")
    return n


def check_rows(
    ds,
    source: str,
    check: Callable[[dict], int],
    bad_rows: str,
    overlong: str,
    max_length: int,
    num_proc: int | None = None,
):
    """Run ``check(row) -> length`` on every row; drop or raise per policy; return (dataset, counts).

    ``check`` raises :class:`BadRowError` for a bad row. ``bad_rows`` is ``error`` or ``skip``;
    ``overlong`` (length > ``max_length``) is ``error`` or ``drop``. Skips are counted by reason.
    """

    def run(row):
        try:
            n, err = check(row), ""
        except BadRowError as e:
            n, err = 0, str(e)
        return {"__len": n, "__err": err}

    # No cache: a fixed image or file must be re-checked on the next run. Only the two result
    # columns are materialised, in memory; the rows themselves are not copied.
    checked = ds.map(
        run,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        load_from_cache_file=False,
        keep_in_memory=True,
        desc=f"checking {Path(source).name}",
    )
    counts: Counter[str] = Counter()
    keep = []
    for i, (n, err) in enumerate(zip(checked["__len"], checked["__err"], strict=True)):
        if err:
            if bad_rows == "error":
                raise BadRowError(f"{source}: {err} (set data.bad_rows: skip to skip and count such rows)")
            counts["bad"] += 1
        elif n > max_length:
            if overlong == "error":
                raise BadRowError(
                    f"{source}: row {ds[i][ROW]}: {n} tokens > max_length {max_length} "
                    "(raise data.max_length, or set data.overlong: drop)"
                )
            counts["overlong"] += 1
        else:
            keep.append(i)
    return (ds.select(keep) if len(keep) < len(ds) else ds), dict(counts)
