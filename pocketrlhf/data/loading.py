"""Load a dataset from jsonl/json/parquet/csv/arrow files, ``save_to_disk`` folders or the hub.

Every problem is one line that names the file, the line or row, and the column.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pocketrlhf.errors import DataError
from pocketrlhf.paths import is_hub_dataset

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _check_json_lines(path: Path) -> None:
    """Validate a JSON-lines file ourselves: the datasets loader's errors do not name the line."""
    first_seen: dict[str, tuple[str, int]] = {}
    rows = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            rows += 1
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                msg = getattr(e, "msg", "not valid UTF-8")
                raise DataError(f"{path}:{lineno}: malformed JSON line ({msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            _check_column_types(obj, first_seen, f"{path}:{lineno}")
    if rows == 0:
        raise DataError(f"{path}: the dataset is empty")


def _json_type(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}[type(value)]


def _check_column_types(row: dict, first_seen: dict[str, tuple[str, int]], where: str) -> None:
    """Arrow needs one type per column; name the line where a column changes type."""
    for column, value in row.items():
        kind = _json_type(value)
        if kind is None:
            continue
        seen = first_seen.setdefault(column, (kind, where))
        if seen[0] != kind:
            raise DataError(f"{where}: column '{column}' is a {kind} here but a {seen[0]} at {seen[1]}")


def _looks_like_json_lines(path: Path) -> bool:
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                return raw.lstrip().startswith(b"{")
    return True


def _csv_problem(path: Path) -> str | None:
    """The line where a quoted field that never closes starts, if ``path`` has one.

    Only strict mode notices an unclosed quote, but it also rejects quirks such as ``"a"b`` that
    the datasets reader accepts: those are left to it.
    """
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, strict=True)
        start = 1
        try:
            for _ in reader:
                start = reader.line_num + 1
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                return f"{path}:{start}: a quoted field opened on this line is never closed"
    return None


def load_records(path: str | Path, split: str = "train"):
    """A ``datasets.Dataset`` with at least one row, from a file, a folder or a hub id."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(path).expanduser()
    source = str(path)
    if p.is_dir():
        try:
            if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(p))
            else:
                ds = datasets.load_dataset(str(p))
        except Exception as e:  # noqa: BLE001 - a folder without data files, or with unreadable ones
            raise DataError(f"{p}: cannot read the folder as a dataset ({str(e).splitlines()[0]})") from None
    elif p.is_file():
        builder = SUFFIXES.get(p.suffix.lower())
        if builder is None:
            raise DataError(f"{p}: unsupported file type '{p.suffix}' (use .jsonl, .json, .parquet, .csv or .arrow)")
        if builder == "json":
            if p.suffix.lower() == ".jsonl" or _looks_like_json_lines(p):
                _check_json_lines(p)
            else:
                try:
                    data = json.loads(p.read_text())
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                    raise DataError(f"{p}: expected a JSON list of objects or one JSON object per line")
                first_seen: dict[str, tuple[str, int]] = {}
                for i, row in enumerate(data, start=1):
                    _check_column_types(row, first_seen, f"{p}: row {i}")
        elif builder == "csv":
            # Checked before datasets reads it: its reader logs a pandas error of its own, naming no line.
            problem = _csv_problem(p)
            if problem:
                raise DataError(problem)
        try:
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as e:  # noqa: BLE001 - pyarrow/csv errors come in many types
            raise DataError(f"{p}: cannot read as {builder}: {str(e).splitlines()[0]}") from None
    elif is_hub_dataset(source):
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{source}: not a local file or folder, and the hub could not provide it ({str(e).splitlines()[0]})") from None
    else:
        raise DataError(f"{source}: no such file or folder")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no '{split}' split (has {', '.join(ds)})")
        ds = ds[split]
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset is empty")
    return ds


def require_string(value, source: str, row: int, column: str, allow_empty: bool = False) -> str | None:
    """A string cell, or None for a missing/empty cell (the caller counts it as skipped)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{source}: row {row}: column '{column}' must be a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        return None
    return value
