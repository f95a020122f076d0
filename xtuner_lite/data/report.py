"""What the data pipeline did to a dataset, as ``check-dataset`` and ``train`` show it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xtuner_lite.atomic import write_text
from xtuner_lite.data.pipeline import DatasetStats
from xtuner_lite.data.preference import PreferenceStats


def stats_table(stats: DatasetStats) -> Table:
    table = Table(title="dataset statistics", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    skipped = sum(stats.rows_skipped.values())
    rows = [
        ("sources", ", ".join(stats.sources)),
        ("rows loaded", f"{stats.rows_loaded}"),
        ("rows skipped", f"{skipped}"),
        *((f"  skipped: {reason}", f"{n}") for reason, n in stats.rows_skipped.items()),
        ("rows truncated to max_length", f"{stats.rows_truncated}"),
        ("rows with chat-control tokens in their text", f"{stats.rows_with_control_tokens}"),
        ("samples kept", f"{stats.samples}"),
        (
            "token length min / mean / p50 / p90 / p99 / max",
            " / ".join(
                f"{stats.lengths[k]:.0f}" for k in ("min", "mean", "p50", "p90", "p99", "max")
            ),
        ),
        ("tokens (trained)", f"{stats.tokens} ({stats.trained_tokens})"),
        ("max_length", f"{stats.max_length}"),
        ("rows after packing" if stats.packed else "rows (unpacked)", f"{stats.rows}"),
        ("packing efficiency (real tokens / slots)", f"{stats.packing_efficiency:.1%}"),
        ("loaded from cache", "yes" if stats.from_cache else "no"),
    ]
    for what, value in rows:
        table.add_row(what, value)
    return table


def pair_table(stats: PreferenceStats) -> Table:
    """What a preference dataset holds: units, truncation and response lengths by side."""
    table = Table(title="preference statistics", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    paired = stats.kind == "pairs"
    sides = ("chosen", "rejected") if paired else ("completion", "KL (mismatched) completion")
    rows = [
        ("pairs" if paired else "unpaired examples", f"{stats.units}"),
        ("prompts trimmed on the left", f"{stats.prompts_trimmed}"),
        ("responses cut to a common budget", f"{stats.responses_trimmed}"),
        ("mean prompt tokens", f"{stats.prompt_mean:.1f}"),
        *(
            (f"mean trained tokens: {side}", f"{mean:.1f}")
            for side, mean in zip(sides, stats.response_means)
        ),
    ]
    if paired:
        rows.append(("pairs whose chosen response is longer", f"{stats.first_longer:.1%}"))
    else:
        rows.append(
            ("desirable / undesirable", f"{stats.desirable} / {stats.units - stats.desirable}")
        )
    for what, value in rows:
        table.add_row(what, value)
    return table


def report_stats(stats: DatasetStats, console: Console, examples: int = 5) -> None:
    """The statistics table, then a few skipped rows with their reasons."""
    console.print(stats_table(stats))
    if isinstance(stats, PreferenceStats):
        console.print(pair_table(stats))
    _examples(stats, console, examples)


def report_skips(stats: DatasetStats, console: Console, examples: int = 3) -> None:
    """One line of what was loaded, skipped (by reason) and truncated, then a few skipped rows."""
    console.print(summary_line(stats), highlight=False, markup=False, soft_wrap=True)
    _examples(stats, console, examples)


def _examples(stats: DatasetStats, console: Console, examples: int) -> None:
    for example in stats.skipped_examples[:examples]:
        console.print(f"[yellow]skipped[/] {example}", highlight=False, soft_wrap=True)


def summary_line(stats: DatasetStats) -> str:
    """One line: rows loaded, kept, skipped by reason, truncated."""
    skipped = sum(stats.rows_skipped.values())
    reasons = "; ".join(f"{n} {reason}" for reason, n in stats.rows_skipped.items())
    control = (
        f"; WARNING: {stats.rows_with_control_tokens} rows have chat-control tokens in "
        "their text, which can forge turns (train_dataset.control_tokens='escape' or "
        "'skip')"
        if stats.rows_with_control_tokens
        else ""
    )
    return (
        f"data: {stats.rows_loaded} rows loaded, {stats.samples} kept, {skipped} skipped"
        + (f" ({reasons})" if reasons else "")
        + f", {stats.rows_truncated} truncated to max_length={stats.max_length}"
        + control
    )


def write_report(stats: DatasetStats, path: str | Path) -> None:
    """The statistics as JSON (``WORK_DIR/dataset_stats.json``)."""
    write_text(path, json.dumps(asdict(stats), indent=1, ensure_ascii=False))
