"""The inputs of ``xtuner data prepare`` as datatrove Documents.

Our own reader, not datatrove's: theirs log and skip an unreadable line, where a bad line here is
an error naming file, line and field; and they read neither JSON arrays nor one-document-per-line
text. Nor ``xtuner_lite.data.loaders.load_rows`` (the training loader): it imports the training
data package (torch) into every worker and holds each file in memory, where this streams lines.
Documents are dealt to tasks round-robin in input order, so a run's output is the same for
any number of worker processes (workers only run the fixed tasks in parallel).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from xtuner_lite.data.ngrams import strings_in
from xtuner_lite.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".html", ".htm")
HTML = (".html", ".htm")  # one document per file, turned into text by the html_to_text stage
PLAIN = (".txt",) + HTML  # read as {"text": ...} whatever the text_key
KINDS = ("text", "sft")
# an HTML page's declared encoding, looked for in its first bytes
CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def _decoded(raw: bytes, path: Path, where: str, first: bool = False) -> str:
    """UTF-8 text; a file's first bytes may carry a byte-order mark (read as the training
    loader reads it)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); convert the file, "
            "e.g. `iconv -f GB18030 -t UTF-8`",
            str(path),
            where,
        ) from None


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            line = _decoded(raw, path, f"line {number}", number == 1).strip()
            if not line:
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON: {exc.msg}", str(path), f"line {number}") from None


def _json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _decoded(path.read_bytes(), path, "file", first=True)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg}", str(path), f"line {exc.lineno}") from None
    if not isinstance(rows, list):
        raise DataError("expected a JSON array of rows", str(path))
    for number, row in enumerate(rows):
        yield f"row {number}", row


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # only for parquet inputs

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise DataError(f"not a readable parquet file ({exc})", str(path)) from None
    for number, row in enumerate(table.to_pylist()):
        yield f"row {number}", row


def _txt(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            line = _decoded(raw, path, f"line {number}", number == 1).strip()
            if line:
                yield f"line {number}", {"text": line}


def _html_text(raw: bytes, path: Path) -> str:
    """A page's text: UTF-8, or the encoding its ``<meta charset>`` declares."""
    declared = CHARSET.search(raw[:4096])
    if declared is None:
        return _decoded(raw, path, "file", first=True)
    name = declared.group(1).decode("ascii", "replace")
    try:
        return raw.decode(codecs.lookup(name).name)
    except (LookupError, UnicodeError) as exc:  # "undefined" is a codec that always fails
        raise DataError(f"cannot decode as its declared charset {name!r} ({exc})", str(path),
                        "file") from None  # fmt: skip


def _html(path: Path) -> Iterator[tuple[str, Any]]:
    yield "file", {"text": _html_text(path.read_bytes(), path)}


READERS = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".txt": _txt}
READERS.update({suffix: _html for suffix in HTML})


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row) for each row of one input file."""
    if not path.is_file():
        raise DataError("input file not found", str(path))
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported file type {path.suffix!r} (read: {', '.join(SUFFIXES)})",
                        str(path))  # fmt: skip
    try:
        yield from reader(path)
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", str(path)) from None


def row_text(row: Any, kind: str, text_key: str, path: Path, where: str) -> str:
    """The text a row is judged by: its ``text_key`` field, or every string of an SFT row."""
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}", str(path), where)
    if kind == "sft":
        return "\n".join(strings_in(row))
    if text_key not in row:
        raise DataError("missing", str(path), where, text_key)
    if not isinstance(row[text_key], str):
        raise DataError(f"expected a string, got {type(row[text_key]).__name__}", str(path),
                        where, text_key)  # fmt: skip
    return row[text_key]


class RowReader(PipelineStep):
    """Every row of ``files`` as a Document (SFT rows keep the row itself in metadata).

    Bad input ends the task with its error written to ``errors/<rank>.txt`` for the launching
    process to raise (an exception here would print datatrove's traceback from every task)."""

    name = "📖 rows"
    type = "📖 - READER"

    def __init__(
        self, files: list[str], kind: str = "text", text_key: str = "text", errors: Path = None
    ):
        super().__init__()
        self.files = [Path(f) for f in files]
        self.kind = kind
        self.text_key = text_key
        self.errors = errors

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        try:
            yield from self.documents(rank, world_size)
        except DataError as exc:
            if self.errors is None:
                raise
            self.errors.mkdir(parents=True, exist_ok=True)
            (self.errors / f"{rank:05d}.txt").write_text(str(exc))

    def documents(self, rank: int, world_size: int) -> Iterator[Document]:
        index = 0
        for file_index, path in enumerate(self.files):
            for where, row in read_rows(path):
                index += 1
                if (index - 1) % world_size != rank:
                    continue
                key = "text" if path.suffix.lower() in PLAIN else self.text_key
                text = row_text(row, self.kind, key, path, where)
                meta = {"source": f"{path.name}:{where}"}
                if self.kind == "sft":
                    meta["row"] = row
                self.stat_update("documents")
                yield Document(text=text, id=f"{file_index}:{where.split()[-1]}", metadata=meta)
