"""Stage 1: load raw rows from json, jsonl, csv, parquet, a saved HF dataset folder or a hub id.

Every row keeps where it came from (file and line/row) so later stages can name it in errors.
We parse JSON ourselves rather than through ``datasets`` because its errors lose the line number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xtuner_lite.errors import DataError


@dataclass
class Rows:
    """Raw rows of one source plus how to name each of them in a message."""

    source: str
    records: list[Any]
    unit: str = "row"  # "line" for jsonl, "row" otherwise
    numbers: list[int] = field(default_factory=list)  # 1-based line numbers for jsonl

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
        raise DataError(f"not valid UTF-8 (byte {exc.start} on line {line}: "
                        f"{data[exc.start:exc.start + 1]!r}); re-save the file as UTF-8",
                        source=str(path), location=f"line {line}") from None


def _load_json(path: Path) -> Rows:
    text = _read_text(path)
    if not text.strip():
        raise DataError("file is empty", source=str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a .json file that is really JSON Lines
            return _load_jsonl(path, text)
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", source=str(path),
                        location=f"line {exc.lineno}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1:
            data = data[lists[0]]
        else:
            raise DataError("expected a JSON list of records (or an object holding one list)",
                            source=str(path))
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}",
                        source=str(path))
    return Rows(str(path), data)


def _load_jsonl(path: Path, text: str | None = None) -> Rows:
    text = _read_text(path) if text is None else text
    records, numbers = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", source=str(path),
                            location=f"line {lineno}") from None
        numbers.append(lineno)
    if not records:
        raise DataError("file is empty", source=str(path))
    return Rows(str(path), records, unit="line", numbers=numbers)


def _load_table(path: Path, kind: str) -> Rows:
    import datasets

    if kind == "csv":
        _read_text(path)  # fail early, with a line number, on non-UTF-8 bytes
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise DataError(f"could not read {kind}: {exc}", source=str(path)) from None
    if len(ds) == 0:
        raise DataError("file is empty", source=str(path))
    rows = Rows(str(path), ds.to_list())
    if kind == "csv":  # row i is on line i + 2 (1-based, after the header)
        rows.unit, rows.numbers = "line", list(range(2, len(ds) + 2))
    return rows


def load_rows(path: str | os.PathLike, split: str = "train") -> Rows:
    """Load one data source: a file, a saved HF dataset folder, or a hub dataset id."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if p.is_dir():
        return _load_saved_dataset(p, split)
    if p.exists():
        if suffix == ".json":
            return _load_json(p)
        if suffix == ".jsonl":
            return _load_jsonl(p)
        if suffix in (".csv", ".tsv"):
            return _load_table(p, "csv")
        if suffix == ".parquet":
            return _load_table(p, "parquet")
        raise DataError(f"unsupported file type {suffix!r} (json, jsonl, csv, parquet or a "
                        "saved dataset folder)", source=str(p))
    if suffix in (".json", ".jsonl", ".csv", ".parquet") or str(path).startswith((".", "/", "~")):
        raise DataError("file not found", source=str(p))
    return _load_hub_dataset(str(path), split)


def _load_saved_dataset(p: Path, split: str) -> Rows:
    import datasets

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
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split=split)
    except Exception as exc:  # noqa: BLE001 - offline or unknown id: say which
        raise DataError(f"not a local file and could not be loaded as a hub dataset "
                        f"({type(exc).__name__}: {exc})", source=repo_id) from None
    return Rows(repo_id, ds.to_list())
