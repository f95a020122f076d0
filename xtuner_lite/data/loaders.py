"""Stage 1: load raw rows from json, jsonl, csv, parquet, a saved HF dataset folder or a hub id.

Every row keeps where it came from (file and line/row) so later stages can name it in errors.
We parse JSON ourselves rather than through ``datasets`` because its errors lose the line number.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from xtuner_lite.errors import DataError


@dataclass
class Rows:
    """Raw rows of one source plus how to name each of them in a message."""

    source: str
    records: list[Any]
    unit: str = "row"  # "line" for jsonl, "row" otherwise
    numbers: list[int] = field(default_factory=list)  # 1-based line numbers for jsonl
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (where, why): unparsed lines

    def locate(self, index: int) -> str:
        if self.numbers:
            return f"{self.unit} {self.numbers[index]}"
        return f"{self.unit} {index}"

    def __len__(self) -> int:
        return len(self.records)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"not valid UTF-8 (byte {exc.start} on line {line}: "
            f"{data[exc.start : exc.start + 1]!r}); re-save the file as UTF-8",
            source=str(path),
            location=f"line {line}",
        ) from None


def _load_json(path: Path, skip_invalid: bool = False) -> Rows:
    text = _read_text(path)
    if not text.strip():
        raise DataError("file is empty", source=str(path))
    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError("JSON nested too deeply to read", source=str(path)) from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a .json file that is really JSON Lines
            return _load_jsonl(path, text, skip_invalid)
        raise DataError(
            f"invalid JSON: {exc.msg} (column {exc.colno})",
            source=str(path),
            location=f"line {exc.lineno}",
        ) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1:
            data = data[lists[0]]
        else:
            raise DataError(
                "expected a JSON list of records (or an object holding one list)", source=str(path)
            )
    if not isinstance(data, list):
        raise DataError(
            f"expected a JSON list of records, got {type(data).__name__}", source=str(path)
        )
    return Rows(str(path), data)


def _load_jsonl(path: Path, text: str | None = None, skip_invalid: bool = False) -> Rows:
    text = _read_text(path) if text is None else text
    records, numbers, invalid = [], [], []
    # only "\n" ends a JSON Lines record: str.splitlines() also splits at U+2028, U+2029, U+0085
    # and other characters that are valid inside a JSON string
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            kind, reason = "invalid JSON", f"invalid JSON: {exc.msg} (column {exc.colno})"
        except RecursionError:
            kind = reason = "JSON nested too deeply"
        else:
            numbers.append(lineno)
            continue
        if not skip_invalid:
            raise DataError(reason, source=str(path), location=f"line {lineno}") from None
        invalid.append((f"line {lineno}", kind))
    if not records and not invalid:
        raise DataError("file is empty", source=str(path))
    return Rows(str(path), records, unit="line", numbers=numbers, invalid=invalid)


def _csv_record_lines(text: str, delimiter: str, path: Path) -> list[int]:
    """The 1-based line each data record of a CSV starts on (a quoted field may span lines);
    a record with more fields than the header, or no record at all, is an error naming it."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    starts, previous, width = [], 0, None
    for row in reader:
        start, previous = previous + 1, reader.line_num
        if not row:  # blank lines are not records
            continue
        if width is None:
            width = len(row)
            continue
        if len(row) > width:
            raise DataError(
                f"{len(row)} fields, but the header names {width}; quote fields that hold the "
                "delimiter",
                source=str(path),
                location=f"line {start}",
            )
        starts.append(start)
    if width is not None and not starts:
        raise DataError("the file has a header and no rows", source=str(path))
    return starts


def _load_table(path: Path, kind: str) -> Rows:

    text = _read_text(path) if kind == "csv" else ""  # non-UTF-8 bytes: fail with a line
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    starts = _csv_record_lines(text, delimiter, path) if kind == "csv" else []
    try:
        ds = datasets.load_dataset(
            kind,
            data_files=str(path),
            split="train",
            **({"delimiter": delimiter} if kind == "csv" else {}),
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise DataError(f"could not read {kind}: {exc}", source=str(path)) from None
    if len(ds) == 0:
        raise DataError("file is empty", source=str(path))
    rows = Rows(str(path), ds.to_list())
    if kind == "csv":
        rows.unit = "line"
        rows.numbers = starts if len(starts) == len(ds) else list(range(2, len(ds) + 2))
    return rows


def expand(data_files: list[str]) -> list[str]:
    """Data sources with glob patterns expanded (sorted); a pattern matching nothing is an
    error naming it."""
    out = []
    for ref in data_files:
        if any(c in ref for c in "*?[") and not Path(ref).expanduser().exists():
            matches = sorted(glob.glob(os.path.expanduser(ref), recursive=True))
            if not matches:
                raise DataError("no file matches this pattern", source=ref)
            out.extend(matches)
        else:
            out.append(ref)
    return out


def load_rows(path: str | os.PathLike, split: str = "train", skip_invalid: bool = False) -> Rows:
    """Load one data source: a file, a saved HF dataset folder, or a hub dataset id.
    ``skip_invalid``: JSON Lines that do not parse are listed in ``Rows.invalid``, not raised."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if p.is_dir():
        return _load_saved_dataset(p, split)
    if p.exists():
        if suffix == ".json":
            return _load_json(p, skip_invalid)
        if suffix == ".jsonl":
            return _load_jsonl(p, skip_invalid=skip_invalid)
        if suffix in (".csv", ".tsv"):
            return _load_table(p, "csv")
        if suffix == ".parquet":
            return _load_table(p, "parquet")
        raise DataError(
            f"unsupported file type {suffix!r} (json, jsonl, csv, parquet or a "
            "saved dataset folder)",
            source=str(p),
        )
    if suffix in (".json", ".jsonl", ".csv", ".tsv", ".parquet") or str(path).startswith(
        (".", "/", "~")
    ):
        raise DataError("file not found", source=str(p))
    return _load_hub_dataset(str(path), split)


def _load_saved_dataset(p: Path, split: str) -> Rows:

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as exc:
        raise DataError(f"not a saved HF dataset folder ({exc})", source=str(p)) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"no split {split!r}; has {list(ds)}", source=str(p))
        ds = ds[split]
    if len(ds) == 0:
        raise DataError("dataset is empty", source=str(p))
    return Rows(str(p), ds.to_list())


def _load_hub_dataset(repo_id: str, split: str) -> Rows:

    try:
        ds = datasets.load_dataset(repo_id, split=split)
    except Exception as exc:  # noqa: BLE001 - offline or unknown id: say which
        raise DataError(
            f"not a local file and could not be loaded as a hub dataset "
            f"({type(exc).__name__}: {exc})",
            source=repo_id,
        ) from None
    return Rows(repo_id, ds.to_list())
