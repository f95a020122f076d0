"""``xtuner contamination``: which evaluation samples also appear in the training data.

Word n-grams (lower-cased, punctuation dropped) of every training row are hashed once; each
evaluation row is flagged when its own n-grams hit that set, with the share that did and the
training row they came from (OpenCompass's n-gram data-contamination check).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from xtuner_lite.data.ngrams import ngrams, strings_in
from xtuner_lite.errors import XtunerError
from xtuner_lite.evaluation.run import resolve_task
from xtuner_lite.evaluation.tasks import Row, load_rows, read_rows
from xtuner_lite.values import Flag, Fraction, NonNegativeInt, PositiveInt


@dataclass
class Overlap:
    source: str  # the evaluation row
    share: float  # of its n-grams found in the training data
    hits: int
    total: int
    train_source: str  # the training row of the first hit
    example: str  # that n-gram


def find_overlaps(
    train_rows: list[Row], eval_rows: list[Row], n: int = 13, threshold: float = 0.0
) -> tuple[list[Overlap], int]:
    """(flagged evaluation rows, number of evaluation rows too short to hold an n-gram)."""
    seen: dict[int, int] = {}
    for index, row in enumerate(train_rows):
        for text in strings_in(row.fields):
            for gram in ngrams(text, n):
                seen.setdefault(hash(gram), index)
    flagged, short = [], 0
    for row in eval_rows:
        grams = [g for text in strings_in(row.fields) for g in ngrams(text, n)]
        if not grams:
            short += 1
            continue
        hits = [g for g in grams if hash(g) in seen]
        share = len(hits) / len(grams)
        if hits and share > threshold:
            first = train_rows[seen[hash(hits[0])]]
            flagged.append(
                Overlap(row.source, share, len(hits), len(grams), first.source, " ".join(hits[0]))
            )
    flagged.sort(key=lambda o: o.share, reverse=True)
    return flagged, short


def report_contamination(
    train_data: list[str],
    task: Annotated[str, Flag(option=True)],
    data_root: str | None = None,
    ngram: PositiveInt = 13,
    threshold: Fraction = 0.0,
    show: NonNegativeInt = 10,
    out: str | None = None,
) -> list[Overlap]:
    """N-gram overlap of training data with a task.

    List evaluation samples whose n-grams occur in the training data (OpenCompass's
    contamination check).

    Args:
        train_data: training files (jsonl/json, any text fields)
        task: bundled task name or task .json file
        data_root: folder the bundled tasks' files are relative to (default $XTUNER_EVAL_DATA)
        ngram: n-gram length in words
        threshold: flag a sample when more than this share of its n-grams overlap
        show: overlapping samples to print
        out: JSON file listing every flagged sample
    """
    n = ngram

    if n < 1:
        raise XtunerError(f"--ngram must be at least 1, got {n}")
    spec = resolve_task(task)
    train_rows = []
    for name in train_data:
        path = Path(name)
        if not path.is_file():
            raise XtunerError(f"training file {path} does not exist")
        train_rows += read_rows(path)
    eval_rows = load_rows(spec, data_root)
    flagged, short = find_overlaps(train_rows, eval_rows, n, threshold)
    print(
        f"{len(flagged)} of {len(eval_rows)} {spec.name} samples share a {n}-word n-gram with "
        f"{len(train_rows)} training rows" + (f" (threshold {threshold:.0%})" if threshold else "")
    )
    if short:
        print(
            f"{short} samples have fewer than {n} words and were not checked "
            "(use a smaller --ngram to include them)"
        )
    for o in flagged[:show]:
        print(f'  {o.share:6.1%}  {o.source}  ~ {o.train_source}: "{o.example}"')
    if out is not None:
        Path(out).write_text(
            json.dumps(
                {
                    "task": spec.name,
                    "ngram": n,
                    "checked": len(eval_rows) - short,
                    "too_short": short,
                    "flagged": [vars(o) for o in flagged],
                },
                indent=1,
            )
        )
    return flagged
