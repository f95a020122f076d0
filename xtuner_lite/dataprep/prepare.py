"""``prepare``: the Python API behind ``xtuner data prepare`` — named phases, one place."""

from __future__ import annotations

import hashlib
import json
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from xtuner_lite.dataprep.config import PrepareConfig, load_prepare_config
from xtuner_lite.dataprep.pipeline import (
    DATA,
    WORK,
    build_runs,
    drop_intermediates,
    fresh_output,
    launch_slurm,
    raise_task_errors,
    run_local,
    run_ray,
    write_json,
)
from xtuner_lite.dataprep.report import build_report, plot_report, print_report
from xtuner_lite.errors import XtunerError

CONFIG = "config.json"  # under _work: the validated settings, for `xtuner data report`
SECONDS = "seconds.json"


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
) -> dict | None:
    """Run a data-preparation config; returns the report (also in ``OUT/report.json``).

    With ``run.executor="slurm"`` the runs are submitted as dependent job arrays and this returns
    None; ``xtuner data report OUT`` writes the report once they have finished."""
    # phase 1: settings, validated as a whole
    cfg = config if isinstance(config, PrepareConfig) else load_prepare_config(config, overrides)
    if workers is not None:
        if workers < 1:
            raise XtunerError(f"--workers must be at least 1, got {workers}")
        cfg.workers = workers
    # phase 2: the runs
    fresh_output(cfg.output, overwrite)
    work, errors = cfg.output / WORK, cfg.output / WORK / "errors"
    write_json(work / CONFIG, cfg.to_dict())
    runs = build_runs(cfg, errors)
    # phase 3: execute (or submit)
    if cfg.executor == "slurm":
        jobs = launch_slurm(runs, work, cfg.slurm)
        print(f"submitted {len(jobs)} Slurm jobs ({', '.join(jobs)}); when the last has finished, "
              f"`xtuner data report {cfg.output}` writes and prints the report")  # fmt: skip
        return None
    if cfg.executor == "ray":
        seconds = run_ray(runs, work, cfg.workers, errors, cfg.ray)
    else:
        seconds = run_local(runs, work, cfg.workers, errors)
    write_json(work / SECONDS, seconds)
    # phase 4: report and manifest
    report = finish(cfg, seconds)
    if not quiet:
        print_report(report)
    return report


def finish(cfg: PrepareConfig, seconds: dict[str, float]) -> dict:
    """The report, plots and manifest of a finished run."""
    raise_task_errors(cfg.output / WORK / "errors")
    input_bytes = sum(Path(f).stat().st_size for f in cfg.data_files)
    report = build_report(cfg, seconds, input_bytes)
    plots = plot_report(report, cfg.output / "plots")
    report["plots"] = [str(p.relative_to(cfg.output)) for p in plots]
    write_json(cfg.output / "report.json", report)
    write_json(cfg.output / "manifest.json", manifest(cfg, report))
    drop_intermediates(cfg)
    return report


def load_report(out: str | Path) -> dict:
    """The report of an output folder; written first where a cluster run has just finished."""
    out = Path(out)
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    snapshot = out / WORK / CONFIG
    if not snapshot.is_file():
        raise XtunerError(f"{out} is not the output folder of `xtuner data prepare`")
    if not (out / DATA).is_dir():
        raise XtunerError(f"{out}: no output shards yet; have all the prepare jobs finished?")
    cfg = PrepareConfig.from_dict(json.loads(snapshot.read_text()))
    seconds = out / WORK / SECONDS
    return finish(cfg, json.loads(seconds.read_text()) if seconds.is_file() else {})
