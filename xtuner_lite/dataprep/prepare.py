"""``prepare``: the Python API behind ``xtuner data prepare`` — named phases, one place."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from xtuner_lite.dataprep.runs import (
    DATA,
    WORK,
    build_runs,
    drop_intermediates,
    launch_slurm,
    mark_output,
    output_problems,
    raise_task_errors,
    run_local,
    run_ray,
    staging_folder,
    swap_into_place,
    write_json,
)
from xtuner_lite.dataprep.settings import PrepareConfig, load_prepare_config
from xtuner_lite.dataprep.summary import build_report, plot_report, print_report
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
    # phase 2: where to write: never over an input or a folder we did not write, and an earlier
    # output is replaced only once the new one is complete
    if problems := output_problems(cfg, overwrite):
        raise XtunerError("\n".join(problems))
    if cfg.executor == "slurm":  # the jobs write in place after we return
        mark_output(cfg.output)
        return _submit(cfg)
    build = dataclasses.replace(cfg, output=staging_folder(cfg.output))
    try:
        report = _run(build)
    except BaseException:
        shutil.rmtree(build.output, ignore_errors=True)
        raise
    swap_into_place(build.output, cfg.output)
    write_json(cfg.output / WORK / CONFIG, cfg.to_dict())  # the snapshot names the real folder
    if not quiet:
        print_report(report)
    return report


def _submit(cfg: PrepareConfig) -> None:
    work = cfg.output / WORK
    write_json(work / CONFIG, cfg.to_dict())
    jobs = launch_slurm(build_runs(cfg, work / "errors"), work, cfg.slurm)
    print(f"submitted {len(jobs)} Slurm jobs ({', '.join(jobs)}); when the last has finished, "
          f"`xtuner data report {cfg.output}` writes and prints the report")  # fmt: skip


def _run(cfg: PrepareConfig) -> dict:
    """Build the whole output in ``cfg.output``: the runs, then the report and manifest (the
    config snapshot is written once the output is in its place, naming that folder)."""
    work, errors = cfg.output / WORK, cfg.output / WORK / "errors"
    runs = build_runs(cfg, errors)
    if cfg.executor == "ray":
        seconds = run_ray(runs, work, cfg.workers, errors, cfg.ray)
    else:
        seconds = run_local(runs, work, cfg.workers, errors)
    write_json(work / SECONDS, seconds)
    return finish(cfg, seconds)


def finish(cfg: PrepareConfig, seconds: dict[str, float]) -> dict:
    """The report, plots and manifest of a finished run."""
    raise_task_errors(cfg.output / WORK / "errors")
    input_bytes = sum(Path(f).stat().st_size for f in cfg.data_files)
    report = build_report(cfg, seconds, input_bytes)
    if report["documents_out"] == 0:
        raise XtunerError(nothing_survived(cfg, report))
    plots = plot_report(report, cfg.output / "plots")
    report["plots"] = [str(p.relative_to(cfg.output)) for p in plots]
    write_json(cfg.output / "report.json", report)
    write_json(cfg.output / "manifest.json", manifest(cfg, report))
    drop_intermediates(cfg)
    return report


def nothing_survived(cfg: PrepareConfig, report: dict) -> str:
    """The error for a run that kept no document: nothing is written (the rule in
    docs/data-prep.md), and the message says where every document went."""
    inputs = ", ".join(str(f) for f in cfg.data_files)
    if report["documents_in"] == 0:
        return f"the inputs hold no document ({inputs}); nothing written to {cfg.output}"
    removed = [f"{s['stage']}: {sum(s['removed'].values())}" for s in report["stages"]
               if sum(s["removed"].values())]  # fmt: skip
    return (f"no document survived: {report['documents_in']} read from {inputs}, removed by "
            f"{', '.join(removed) or 'no stage'}; nothing written")  # fmt: skip


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
