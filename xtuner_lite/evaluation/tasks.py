"""Evaluation tasks as data: a small spec per task, so a user adds an MCQ or QA set without code.

A spec is a dict (in a Python config, or a ``.json`` file) with the fields of :class:`TaskSpec`;
rows come from local JSONL/JSON/CSV files (no dataset hub on these machines). Every reading error
names the file, the line and the field.
"""

from __future__ import annotations

import csv
import difflib
import glob
import json
import os
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from xtuner_lite.errors import XtunerError

KINDS = ("mcq", "generate", "perplexity", "preference")
STYLES = ("cloze", "letter", "partial")


@dataclass
class TaskSpec:
    """One evaluation task. Templates are Python format strings over a row's fields."""

    name: str
    data: str  # file or glob, relative to the data root unless absolute
    kind: str = "mcq"  # mcq | generate | perplexity | preference
    prompt: str = "{question}"  # the context shown to the model
    description: str = ""  # text before the few-shot examples (may use {subject})
    # multiple choice
    style: str = "cloze"  # cloze: score " {choice}" | letter: show A/B/C/D, score " A" |
    #                       partial: choices are contexts, score the shared continuation
    choices: str | list[str] = "choices"  # a list field, or the fields holding each option
    answer: str = "answer"  # gold: an index, or a letter (letter style)
    continuation: str = " {choice}"  # what is scored after the prompt (cloze)
    letters: str = "ABCDEFGHIJ"
    circular: bool | None = None  # rotate the options (default: on for letter style)
    scoring: str = "loglik"  # loglik | generate (letter style: the model writes the letter)
    # few-shot examples: the first rows of ``fewshot_data`` (or of the task's own data)
    num_fewshot: int = 0
    fewshot_data: str | None = None
    fewshot_separator: str = "\n\n"
    fewshot_target: str | None = None  # generation: an exemplar's answer (default " {target}")
    chat: bool = False  # wrap the (few-shot) prompt in the model's chat template
    # generation
    target: str = "answer"  # reference field
    target_regex: str | None = None  # regex whose group 1 is the reference within the field
    extract: str = "none"  # none | last_number | letter | regex:<pattern>
    match: str = "exact"  # exact | contains
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    # perplexity
    text: str = "text"  # field with the text (or whole lines of a .txt file)
    window: int = 1024  # tokens per scoring window
    # preference: rows in any training preference format (pairs); each sequence capped here
    max_length: int = 1024
    # an image-text model's image: the row field holding an image path (relative to the data
    # file) or data URL, shown before the prompt (mcq scored by generation, or generate)
    image: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise XtunerError(f"task {self.name!r}: kind must be one of {KINDS}, not {self.kind!r}")
        if self.style not in STYLES:
            raise XtunerError(
                f"task {self.name!r}: style must be one of {STYLES}, not {self.style!r}"
            )
        if (
            self.scoring not in ("loglik", "generate")
            or self.scoring == "generate"
            and self.kind == "mcq"
            and self.style != "letter"
        ):
            raise XtunerError(
                f"task {self.name!r}: scoring must be 'loglik', or 'generate' with "
                f"style 'letter' (got {self.scoring!r}, style {self.style!r})"
            )
        if self.image is not None and self.kind not in ("generate", "mcq"):
            raise XtunerError(
                f"task {self.name!r}: images need kind 'generate' or 'mcq', not {self.kind!r}"
            )
        if self.circular is None:
            self.circular = self.kind == "mcq" and self.style == "letter"

    @classmethod
    def from_dict(cls, spec: dict[str, Any], source: str = "task spec") -> TaskSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            hints = [difflib.get_close_matches(k, known, 1) for k in unknown]
            detail = ", ".join(
                f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                for k, h in zip(unknown, hints)
            )
            raise XtunerError(f"{source}: unknown key {detail}")
        for key in ("name", "data"):
            if key not in spec:
                raise XtunerError(f"{source}: missing required key {key!r}")
        return cls(**spec)


@dataclass
class Row:
    """One evaluation row: its fields, where it came from (for messages and results)."""

    fields: dict[str, Any]
    source: str  # "file:line"
    subject: str | None = None


def load_spec_file(path: str | os.PathLike) -> TaskSpec:
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise XtunerError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(spec, dict):
        raise XtunerError(f"{path}: a task file holds one JSON object")
    for key in ("data", "fewshot_data"):  # data beside the task file needs no --data-root
        value = spec.get(key)
        if (
            isinstance(value, str)
            and not os.path.isabs(value)
            and glob.glob(str(path.parent / value))
        ):
            spec[key] = str(path.parent / value)
    return TaskSpec.from_dict(spec, str(path))


def resolve_files(pattern: str, data_root: str | os.PathLike | None, task: str) -> list[Path]:
    data_root = data_root or os.environ.get("XTUNER_EVAL_DATA")  # the one default, for every verb
    base = (
        Path(pattern) if os.path.isabs(pattern) or data_root is None else Path(data_root) / pattern
    )
    found = sorted(Path(p) for p in glob.glob(str(base)))
    if not found:
        hint = "" if data_root else " (pass --data-root)"
        raise XtunerError(f"task {task!r}: no data file matches {base}{hint}")
    return found


def _subject(path: Path) -> str:
    """``abstract_algebra_test.csv`` → ``abstract_algebra`` (MMLU/CMMLU file naming)."""
    stem = path.stem
    for suffix in ("_test", "_dev", "_val", "_validation"):
        stem = stem.removesuffix(suffix)
    return stem


def read_rows(path: Path) -> list[Row]:
    """Rows of a JSONL, JSON (a list of objects), CSV (with a header) or text file."""
    suffix = path.suffix.lower()
    rows: list[Row] = []
    multi = None
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise XtunerError(
                        f"{path}:{number}: invalid JSON at column {exc.colno}: {exc.msg}"
                    ) from None
                if not isinstance(value, dict):
                    raise XtunerError(f"{path}:{number}: each line must be a JSON object")
                rows.append(Row(value, f"{path}:{number}"))
    elif suffix == ".json":
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise XtunerError(
                f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        if not isinstance(values, list):
            raise XtunerError(f"{path}: expected a JSON list of objects")
        rows = [Row(v, f"{path}[{i}]") for i, v in enumerate(values)]
    elif suffix == ".csv":
        multi = _subject(path)
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            for record in reader:
                line = reader.line_num
                if None in record:
                    raise XtunerError(
                        f"{path}:{line}: more values than the header's "
                        f"{len(reader.fieldnames)} columns"
                    )
                missing = [k for k, v in record.items() if v is None]
                if missing:
                    raise XtunerError(f"{path}:{line}: no value for column {missing[0]!r}")
                rows.append(Row(dict(record), f"{path}:{line}", multi))
    elif suffix == ".txt":
        rows = [Row({"text": path.read_text(encoding="utf-8")}, str(path))]
    else:
        raise XtunerError(f"{path}: unsupported file type {suffix!r} (jsonl, json, csv, txt)")
    return rows


def load_rows(
    spec: TaskSpec,
    data_root: str | os.PathLike | None,
    limit: int | None = None,
    seed: int = 0,
    which: str | None = None,
) -> list[Row]:
    """The task's rows (or its few-shot rows, ``which="fewshot"``); ``limit`` takes a seeded
    random subset, so two runs with the same seed score the same questions."""
    pattern = spec.fewshot_data if which == "fewshot" and spec.fewshot_data else spec.data
    rows = [r for path in resolve_files(pattern, data_root, spec.name) for r in read_rows(path)]
    if limit is not None and limit < len(rows):
        picked = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in picked]
    return rows


def field_of(row: Row, key: str) -> Any:
    if key not in row.fields:
        raise XtunerError(
            f"{row.source}: missing field {key!r} (has: {', '.join(map(str, row.fields))})"
        )
    return row.fields[key]


def render(template: str, row: Row, **extra: Any) -> str:
    try:
        return template.format(**row.fields, subject=(row.subject or "").replace("_", " "), **extra)
    except KeyError as exc:
        raise XtunerError(
            f"{row.source}: the template {template!r} needs field {exc.args[0]!r}"
            f" (row has: {', '.join(map(str, row.fields))})"
        ) from None


def choices_of(spec: TaskSpec, row: Row) -> list[str]:
    if isinstance(spec.choices, list):
        return [str(field_of(row, key)) for key in spec.choices]
    value = field_of(row, spec.choices)
    if not isinstance(value, list) or not value:
        raise XtunerError(f"{row.source}: field {spec.choices!r} must be a non-empty list")
    return [str(v) for v in value]


def gold_of(spec: TaskSpec, row: Row, num_choices: int) -> int:
    value = field_of(row, spec.answer)
    text = str(value).strip()
    if text.isdigit():
        gold = int(text)
    elif len(text) == 1 and text.upper() in spec.letters[:num_choices]:
        gold = spec.letters.index(text.upper())
    else:
        raise XtunerError(
            f"{row.source}: field {spec.answer!r} = {value!r} is neither an option "
            f"index nor a letter {spec.letters[:num_choices]}"
        )
    if not 0 <= gold < num_choices:
        raise XtunerError(f"{row.source}: answer {gold} is out of range for {num_choices} options")
    return gold
