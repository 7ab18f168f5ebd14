"""Data sources as ``datasets`` names them: a file, a folder, a glob, a hub set, with a config, a split
and a slice, or a dict of ``load_dataset`` arguments; streamed when asked.

A JSON file is read by ``datasets``' JSON builder (cached by it, memory-mapped). Where the builder fails, a
plain read of the file names the file and line at fault (invalid JSON, not an object, not UTF-8, no rows);
a file that reads cleanly that way is one whose field types vary across rows, which the builder is told to
refuse (its ``Json`` columns turn a string such as ``"2"`` into a number): it is built from those rows, in
memory, each such column kept as exact JSON.
"""

from __future__ import annotations

import glob
import json
import re
from functools import partial
from pathlib import Path
from typing import Any

from lightning_vlm.data.rows import BASE, ROW, BadRowError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
KEYS = ("path", "name", "data_dir", "data_files", "split", "streaming")
# where[:config][:split[slice]], e.g. user/set:train, user/set:cfg:train[:10%], data/x.jsonl:train[:100]
SPEC = re.compile(r"(?P<path>[^:]+)(?::(?:(?P<name>[^:\[]+):)?(?P<split>\w+(?:\[[^\]]*\])?))?")


def source_name(source: str | dict | Path) -> str:
    """How errors and logs name a source: the string itself, or ``key=value`` pairs of a dict."""
    return ", ".join(f"{k}={v}" for k, v in source.items()) if isinstance(source, dict) else str(source)


def parse_source(source: str | dict | Path) -> dict[str, Any]:
    """A source as ``load_dataset`` arguments: ``{path, name?, data_dir?, data_files?, split?, streaming?}``."""
    if isinstance(source, dict):
        unknown = sorted(set(source) - set(KEYS))
        if unknown or "path" not in source:
            raise ValueError(
                f"data source {source}: keys are {', '.join(KEYS)}, path required; not {unknown}"
            )
        return {k: v for k, v in source.items() if v is not None}
    source = str(source)  # a str, or a Path given in Python
    match = SPEC.fullmatch(source)
    if Path(source).expanduser().exists() or match is None:  # an existing path may hold ':'
        return {"path": source}
    return {k: v for k, v in match.groupdict().items() if v is not None}


def open_source(source: str | dict):
    """The rows of a source as a ``Dataset`` (or an ``IterableDataset`` when streamed) and the folder
    that relative image paths are resolved against."""
    import datasets

    spec, name = parse_source(source), source_name(source)
    path, split = Path(spec["path"]).expanduser(), spec.get("split", "train")
    kwargs: dict[str, Any] = {k: spec[k] for k in KEYS[1:] if k in spec and k != "split"}
    if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        return _saved(path, name, split, kwargs.get("streaming", False)), str(path)
    pattern = glob.has_magic(str(path))
    files = sorted(glob.glob(str(path))) if pattern else [str(path)] if path.is_file() else []
    if pattern and not files:
        raise FileNotFoundError(f"no files match {name}")
    kind, json_files = None, []
    if files:  # one file or a glob: the builder of their type
        kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
        if None in kinds or len(kinds) > 1:
            raise ValueError(f"{name}: unknown file type; data files end in {', '.join(BUILDERS)}")
        kind, base = kinds.pop(), str(Path(files[0]).parent.resolve())
        args, kwargs["data_files"], json_files = (kind,), files, files if kind == "json" else []
    elif path.is_dir():  # a folder of data files, e.g. a hub snapshot: README configs, data/train-*.parquet
        args, base = (str(path),), str(path)
        json_files = glob.glob(f"{path}/**/*.json*", recursive=True)
        kind = "json" if json_files and not glob.glob(f"{path}/**/*.parquet", recursive=True) else None
    elif path.suffix.lower() in BUILDERS:
        raise FileNotFoundError(f"dataset file not found: {name}")
    else:  # a hub set, or a builder named with data_files ({path: json, data_files: ...})
        args, base = (spec["path"],), _files_base(kwargs.get("data_files"))
        kind = "json" if spec["path"] == "json" else None
    if kwargs.get("streaming") and "[" in split:
        raise ValueError(f"{name}: a streamed split cannot be sliced ({split}); stream the whole split")
    if kind == "json":  # its Json columns would turn a string such as "2" into a number: types vary -> fail
        kwargs["on_mixed_types"] = None
    try:
        ds = datasets.load_dataset(*args, split=split, **kwargs)
        if kind == "json" and not kwargs.get("streaming"):
            ds.data.validate(full=True)  # pyarrow keeps bytes that are not UTF-8: find them now
        return ds, base
    except Exception as err:  # noqa: BLE001 - the builder's errors do not name the file and line
        if kind is None:
            raise
        streamed = kwargs.get("streaming", False)  # a stream is not read whole
        rows = [row for f in json_files if not streamed for row in read_json_rows(Path(f))]  # file, line
        if json_files and not streamed and not rows:
            raise ValueError(f"{name}: holds no rows") from err
        if rows and files:  # types vary across its rows
            return _slice(rows_dataset(rows), split), base
        why = (
            "types vary across rows? name the files to load them as written" if rows else "empty or damaged?"
        )
        raise ValueError(f"{name}: unreadable {kind} ({why}): {err.__cause__ or err}") from err


def _files_base(data_files: Any) -> str:
    """The folder of the first of ``data_files`` (a path, a list, or ``{split: ...}``), else the working one."""
    while isinstance(data_files, (dict, list)) and data_files:
        data_files = next(iter(data_files.values() if isinstance(data_files, dict) else data_files))
    return str(Path(data_files).parent.resolve()) if isinstance(data_files, str) else "."


def _slice(ds, split: str):
    """``ds`` cut as ``split``'s slice says (``train[:10]``, ``train[10%:]``); whole without one."""
    import datasets

    if "[" not in split:
        return ds
    name = split.partition("[")[0]
    (cut,) = datasets.ReadInstruction.from_spec(split).to_absolute({name: len(ds)})
    return ds.select(range(cut.from_, cut.to))


def _saved(path: Path, name: str, split: str, streaming: bool):
    """A ``save_to_disk`` folder: one split, or a split (with its slice) of a saved ``DatasetDict``."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    split_name = split.partition("[")[0]
    if isinstance(ds, datasets.DatasetDict):
        if split_name not in ds:
            raise ValueError(f"{name}: holds the splits {list(ds)}; point at one, e.g. {path}:{list(ds)[0]}")
        ds = ds[split_name]
    ds = _slice(ds, split)
    return ds.to_iterable_dataset() if streaming else ds


def load_source(source: str | dict, columns: dict[str, str], required: tuple[str, ...], alternatives=None):
    """Open a source, rename its columns by ``columns`` (ours -> theirs, e.g. ``{"images": "image"}``)
    and check that each required column exists, or its alternative columns (``{"messages": ("prompt",
    "completion")}``) do. Returns a ``datasets.Dataset`` (an ``IterableDataset``
    when streamed) with ``__row`` (the row's index; in a stream, its index in this reader's share) and
    ``__base`` (the folder that relative image paths are resolved against).
    """
    import datasets

    name = source_name(source)
    ds, base = open_source(source)
    streamed = isinstance(ds, datasets.IterableDataset)
    if not streamed and len(ds) == 0:
        raise ValueError(f"{name}: holds no rows")
    have = ds.column_names or list(next(iter(ds), {}))  # a stream may not know its columns before reading
    renames = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    for theirs in renames:
        if theirs not in have:
            raise KeyError(f"{name}: column mapping names {theirs!r}, but the columns are {have}")
    have = [renames.get(c, c) for c in have]
    ds = ds.rename_columns(renames) if renames else ds
    for col in required:
        instead = (alternatives or {}).get(col)
        if col not in have and not (instead and all(c in have for c in instead)):
            hint = f"map it with data.columns, e.g. {{{col}: <their name>}}"
            hint += f"; or give {' and '.join(map(repr, instead))}" if instead else ""
            raise KeyError(f"{name}: missing column {col!r} ({hint}); the columns are {have}")
    if streamed:
        return ds.map(partial(_numbered, base=base), with_indices=True)
    ds = ds.add_column(ROW, list(range(len(ds))))
    return ds.add_column(BASE, [base] * len(ds))


def rows_dataset(rows: list[dict]):
    """Rows read by hand as a ``Dataset``: a column whose types vary across rows (a number among strings,
    a string content among part lists) is kept as JSON, each value encoded so it reads back as written."""
    import datasets
    import pyarrow as pa

    columns = {}
    for key in dict.fromkeys(k for r in rows for k in r):  # every key, also one first seen in a later row
        values = [r.get(key) for r in rows]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowException, OverflowError):
            columns[key] = pa.array([None if v is None else json.dumps(v) for v in values], pa.json_())
    return datasets.Dataset(datasets.table.InMemoryTable(pa.table(columns)))


def _numbered(row: dict, index: int, base: str) -> dict:
    return {ROW: index, BASE: base}


def read_json_rows(path: Path) -> list[dict]:
    """Read a .jsonl (or a .json list) by hand; errors name the file and the line."""
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
    return [row for _, row in items]


def _loads(text: str, path: Path, line: int = 0) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRowError(f"{path}: line {line or err.lineno} is not valid JSON: {err.msg}") from err
