"""``prepare``: the Python API behind ``xtuner data prepare`` — named phases, one place."""

from __future__ import annotations

import hashlib
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from xtuner_lite.dataprep.config import PrepareConfig, load_prepare_config
from xtuner_lite.dataprep.pipeline import (
    DATA,
    WORK,
    build_runs,
    fresh_output,
    run_local,
    write_json,
    writer,
)
from xtuner_lite.dataprep.report import KEPT, build_report, plot_report, print_report
from xtuner_lite.errors import XtunerError


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(cfg: PrepareConfig, report: dict) -> dict[str, Any]:
    """What produced the output shards: inputs (with hashes), stages, versions, counts."""
    shards = sorted((cfg.output / DATA).glob("*.jsonl"))
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.source,
        "kind": cfg.kind,
        "map_fn": "pretrain" if cfg.kind == "text" else "the map fn of the input rows",
        "inputs": [
            {
                "file": str(Path(f).resolve()),
                "bytes": Path(f).stat().st_size,
                "sha256": _sha256(Path(f)),
            }
            for f in cfg.data_files
        ],
        "stages": [{"type": s.type, **s.settings} for s in cfg.stages],
        "tasks": cfg.tasks,
        "versions": {p: version(p) for p in ("xtuner_lite", "datatrove", "langid")},
        "outputs": [str(p.relative_to(cfg.output)) for p in shards],
        "documents_in": report["documents_in"],
        "documents_out": report["documents_out"],
    }


def prepare(
    config: str | dict | PrepareConfig,
    overrides: dict[str, Any] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Run a data-preparation config; returns the report (also in ``OUT/report.json``)."""
    # phase 1: settings, validated as a whole
    cfg = config if isinstance(config, PrepareConfig) else load_prepare_config(config, overrides)
    if workers is not None:
        if workers < 1:
            raise XtunerError(f"--workers must be at least 1, got {workers}")
        cfg.workers = workers
    if cfg.executor != "local":
        raise XtunerError(
            f"run.executor={cfg.executor!r}: launch with `xtuner data launch` (writes the job), "
            "or set run.executor='local'"
        )
    # phase 2: the runs, with the kept documents' metadata kept aside for the report
    fresh_output(cfg.output, overwrite)
    work, errors = cfg.output / WORK, cfg.output / WORK / "errors"
    runs = build_runs(cfg, errors)
    runs[-1].steps.append(writer(work / KEPT))
    # phase 3: execute
    seconds = run_local(runs, work, cfg.workers, errors)
    # phase 4: report and manifest
    input_bytes = sum(Path(f).stat().st_size for f in cfg.data_files)
    report = build_report(cfg, seconds, input_bytes)
    report["plots"] = [
        str(p.relative_to(cfg.output)) for p in plot_report(report, cfg.output / "plots")
    ]
    write_json(cfg.output / "report.json", report)
    write_json(cfg.output / "manifest.json", manifest(cfg, report))
    if not quiet:
        print_report(report)
    return report
