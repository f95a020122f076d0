"""What ``xtuner data prepare`` kept and removed, and why: ``report.json``, PNG plots, a table.

Counted from the documents themselves (every removed one is in ``removed/<stage>/`` with its
reason, every kept one in ``_work/kept``), so the numbers add up by construction: documents in =
documents out + every removal.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from xtuner_lite.dataprep.runs import KEPT, WORK
from xtuner_lite.dataprep.settings import DEDUP, PrepareConfig

SAMPLES = 3  # removed examples kept per reason
WORD_EDGES = [0, 10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 10**9]
SHARE_EDGES = [i / 20 for i in range(21)]
LENGTH_EDGES = list(range(0, 16))
SIGNALS = ("mean_word_length", "alpha_share", "duplicate_line_share")
QUALITY = ("gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality")
WORDS = re.compile(r"\w+", re.UNICODE)


def documents(folder: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def signals(text: str) -> dict[str, float]:
    """Quality signals plotted for kept vs removed documents."""
    words = WORDS.findall(text)
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return {
        "words": len(words),
        "mean_word_length": sum(map(len, words)) / len(words) if words else 0.0,
        "alpha_share": sum(c.isalpha() for c in text) / len(text) if text else 0.0,
        "duplicate_line_share": 1 - len(set(lines)) / len(lines) if lines else 0.0,
    }


def _counts(values: list[float], edges: list[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for v in values:
        i = max(0, min(bisect.bisect_right(edges, v) - 1, len(counts) - 1))
        counts[i] += 1
    return counts


def histograms(kept: list[dict], removed: list[tuple[str, dict]]) -> dict:
    """Counts over fixed bins (the report stays small however many documents there are):
    words per document in and out; quality signals of kept vs quality-removed documents.
    ``removed``: (stage type, document). Each document's signals are computed once."""
    kept_signals = [signals(d["text"]) for d in kept]
    removed_signals = [(t, signals(d["text"])) for t, d in removed]
    quality = [x for t, x in removed_signals if t in QUALITY]
    words_in = [x["words"] for x in kept_signals] + [x["words"] for _, x in removed_signals]
    out: dict[str, dict] = {
        "words": {"edges": WORD_EDGES, "in": _counts(words_in, WORD_EDGES),
                  "out": _counts([x["words"] for x in kept_signals], WORD_EDGES)}
    }  # fmt: skip
    for key in SIGNALS:
        edges = SHARE_EDGES if key != "mean_word_length" else LENGTH_EDGES
        out[key] = {"edges": edges, "kept": _counts([x[key] for x in kept_signals], edges),
                    "removed": _counts([x[key] for x in quality], edges)}  # fmt: skip
    return out


def _reason(doc: dict, stage_type: str) -> str:
    if stage_type in DEDUP:
        return "exact_duplicate" if stage_type == "exact_dedup" else "near_duplicate"
    return doc.get("metadata", {}).get("filter_reason") or stage_type


def _sample(doc: dict) -> dict[str, str]:
    text = doc.get("text", "")
    return {"source": doc.get("metadata", {}).get("source", ""), "text": text[:300]}


def build_report(cfg: PrepareConfig, seconds: dict[str, float], input_bytes: int) -> dict:
    out, kept_folder = cfg.output, cfg.output / WORK / KEPT
    kept = list(documents(kept_folder))
    stages, removed_docs = [], []
    for stage in cfg.stages:
        reasons: Counter = Counter()
        samples: dict[str, list] = {}
        for doc in documents(out / "removed" / stage.label):
            reason = _reason(doc, stage.type)
            reasons[reason] += 1
            samples.setdefault(reason, [])
            if len(samples[reason]) < SAMPLES:
                samples[reason].append(_sample(doc))
            removed_docs.append((stage, doc))
        stages.append({"stage": stage.label, "type": stage.type, "settings": stage.settings,
                       "removed": dict(reasons), "samples": samples})  # fmt: skip
    total = len(kept) + len(removed_docs)
    remaining = total
    for entry in stages:
        entry["in"] = remaining
        remaining -= sum(entry["removed"].values())
        entry["out"] = remaining
    every = kept + [d for _, d in removed_docs]
    languages = Counter(
        d["metadata"]["language"] for d in every if "language" in d.get("metadata", {})
    )
    clusters = Counter(
        d["metadata"]["minhash_cluster_id"]
        for d in every
        if d.get("metadata", {}).get("minhash_cluster_id", -1) not in (-1, None)
    )
    pii = Counter()
    for d in kept:
        pii.update(d.get("metadata", {}).get("pii", {}))
    wall = sum(seconds.values())
    return {
        "config": cfg.source,
        "documents_in": total,
        "documents_out": len(kept),
        "stages": stages,
        "languages": dict(languages.most_common()),
        "pii_masked_in_kept": dict(pii),
        "near_duplicate_cluster_sizes": dict(sorted(Counter(clusters.values()).items())),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "documents_per_second": round(total / wall, 2) if wall else None,
        "mb_per_second": round(input_bytes / 1e6 / wall, 3) if wall else None,
        "input_bytes": input_bytes,
        "workers": cfg.workers,
        "tasks": cfg.tasks,
        "histograms": histograms(kept, [(s.type, d) for s, d in removed_docs]),
    }


def plot_report(report: dict, folder: Path) -> list[Path]:
    """Length histograms, language distribution, quality signals, duplicate-cluster sizes."""
    import matplotlib  # only reports draw (a slow import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append(folder / name)

    hist = report["histograms"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    labels = [f"<{e}" if e < 10**9 else "more" for e in hist["words"]["edges"][1:]]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], hist["words"]["in"], width=0.4, label="in")
    ax.bar([i + 0.2 for i in x], hist["words"]["out"], width=0.4, label="out")
    ax.set_xticks(list(x), labels, rotation=45)
    ax.set(xlabel="words per document", ylabel="documents", title="lengths")
    ax.legend()
    save(fig, "lengths.png")
    if report["languages"]:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        top = list(report["languages"].items())[:20]
        ax.bar([k for k, _ in top], [v for _, v in top])
        ax.set(ylabel="documents", title="detected languages (documents reaching the stage)")
        save(fig, "languages.png")
    fig, axes = plt.subplots(1, len(SIGNALS), figsize=(12, 3.5), dpi=100)
    for ax, key in zip(axes, SIGNALS):
        edges = hist[key]["edges"]
        ax.stairs(hist[key]["kept"], edges, label="kept")
        ax.stairs(hist[key]["removed"], edges, label="removed by quality filters")
        ax.set(xlabel=key, ylabel="documents")
    axes[0].legend()
    save(fig, "quality_signals.png")
    sizes = report["near_duplicate_cluster_sizes"]
    if sizes:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.bar([str(k) for k in sizes], list(sizes.values()))
        ax.set(xlabel="documents per near-duplicate cluster", ylabel="clusters")
        save(fig, "duplicate_clusters.png")
    return written


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"xtuner data prepare — {report['config']}")
    for col in ("stage", "in", "out", "removed (reason: count)"):
        table.add_column(col, justify="right" if col in ("in", "out") else "left")
    for s in report["stages"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["removed"].items())) or "-"
        table.add_row(s["stage"], str(s["in"]), str(s["out"]), reasons)
    console.print(table)
    console.print(
        f"{report['documents_in']} documents in, {report['documents_out']} out; "
        f"{report['documents_per_second']} documents/s, {report['mb_per_second']} MB/s "
        f"({report['workers']} worker(s), {report['tasks']} tasks)"
    )
    if report["languages"]:
        top = ", ".join(f"{k} {v}" for k, v in list(report["languages"].items())[:8])
        console.print(f"languages: {top}")
    if report["pii_masked_in_kept"]:
        console.print(f"PII masked: {report['pii_masked_in_kept']}")
