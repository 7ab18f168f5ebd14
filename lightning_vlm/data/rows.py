"""Dataset rows: images, chat messages, and the checks every row passes (sources are in sources.py).

Every error names the source, the row index and the field. Rows keep their original index in
the ``__row`` column so that errors raised later (in DataLoader workers) can name them too.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

ROW = "__row"
BASE = "__base"


class BadRowError(ValueError):
    """A dataset row that cannot be used; the message names the row and field."""


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


def judge(n: int, err: str, row: int, source: str, bad_rows: str, overlong: str, max_length: int) -> str:
    """Why a checked row is dropped (``bad``, ``overlong``), or ``""`` to keep it; raises where the policy
    (``bad_rows``: ``error``/``skip``, ``overlong``: ``error``/``drop``) says so."""
    if err:
        if bad_rows == "error":
            raise BadRowError(f"{source}: {err} (set data.bad_rows: skip to skip and count such rows)")
        return "bad"
    if n > max_length:
        if overlong == "error":
            raise BadRowError(
                f"{source}: row {row}: {n} tokens > max_length {max_length} "
                "(raise data.max_length, or set data.overlong: drop)"
            )
        return "overlong"
    return ""


def checked(check: Callable[[dict], int], row: dict) -> tuple[int, str]:
    """``(length, "")`` of a good row, ``(0, error)`` of a bad one."""
    try:
        return check(row), ""
    except BadRowError as e:
        return 0, str(e)


def check_rows(ds, source: str, check: Callable[[dict], int], policy: tuple[str, str, int],
               num_proc: int | None = None, cache: Path | None = None):  # fmt: skip
    """Run ``check(row) -> length`` on every row; drop or raise per ``policy`` (``bad_rows``, ``overlong``,
    ``max_length``, see :func:`judge`); return (dataset, counts of the skipped rows by reason, the kept rows'
    token lengths).

    ``check`` raises :class:`BadRowError` for a bad row. With ``cache`` (a file named by the dataset's
    fingerprint and the check's settings) the results of an earlier run are read from it, and only the
    rows that were bad are checked again (an image may have been fixed since); otherwise the results are
    written there. Only the two results per row are kept; the rows themselves are not copied.
    """
    import pyarrow.parquet as pq

    if cache is not None and cache.is_file():
        results = pq.read_table(cache)
        lengths, errors = results["__len"].to_pylist(), results["__err"].to_pylist()
        for i in [i for i, err in enumerate(errors) if err]:
            lengths[i], errors[i] = checked(check, ds[i])
    else:
        results = ds.map(
            lambda row: dict(zip(("__len", "__err"), checked(check, row), strict=True)),
            num_proc=num_proc,
            remove_columns=ds.column_names,
            load_from_cache_file=False,
            keep_in_memory=True,
            desc=f"checking {Path(source).name}",
        ).data.table  # whole columns: a datasets Column read item by item is slow
        lengths, errors = results["__len"].to_pylist(), results["__err"].to_pylist()
        if cache is not None:  # written whole, then renamed: a killed run leaves no half file
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.partial")
            pq.write_table(results, partial)
            partial.replace(cache)
    counts: Counter[str] = Counter()
    keep = []
    for i, (n, err) in enumerate(zip(lengths, errors, strict=True)):
        reason = judge(n, err, i, source, *policy)  # rows are checked as loaded: ``__row`` is ``i``
        if reason:
            counts[reason] += 1
        else:
            keep.append(i)
    return (ds.select(keep) if len(keep) < len(ds) else ds), dict(counts), [lengths[i] for i in keep]
