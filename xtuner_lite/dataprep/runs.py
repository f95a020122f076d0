"""``xtuner data prepare``: a validated config → datatrove runs → output shards and a manifest.

Per-document stages run in one datatrove pipeline. A deduplication stage needs every document
seen first, so it splits the pipeline: the documents so far are written to an intermediate
folder, datatrove's signature / bucket / cluster runs look at all of them, and the next run reads
the folder back through the dedup filter. Every filter writes what it removes to
``OUT/removed/<stage>/`` with its reason, which the report counts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.writers import JsonlWriter

from xtuner_lite.data.ngrams import strings_in
from xtuner_lite.dataprep.reader import RowReader, read_rows
from xtuner_lite.dataprep.settings import (
    DEDUP,
    QUALITY_FILTERS,
    PrepareConfig,
    StageConfig,
)
from xtuner_lite.dataprep.stages import (
    BlocklistFilter,
    DecontaminateFilter,
    HtmlToText,
    LanguageFilter,
    MaskPII,
    Normalize,
    eval_grams,
    read_words,
)
from xtuner_lite.errors import XtunerError

WORK = "_work"  # intermediate folders, signatures and logs, under the output folder
KEPT = "kept"  # under _work: the kept documents with their metadata
DATA = "data"  # the output shards
REMOVED = "removed"


@dataclass
class Run:
    """One datatrove executor run: its steps over ``tasks`` tasks."""

    name: str
    steps: list[Any]
    tasks: int


def writer(folder: Path, adapter: Any = None) -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None,
                       adapter=adapter)  # fmt: skip


class ShardReader(PipelineStep):
    """Task r reads shard r of an intermediate folder (none where task r kept nothing). Own step:
    datatrove's reader deals the files that exist to tasks by position, and raises when a
    filter left no file at all."""

    name = "📂 shard"
    type = "📖 - READER"

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1):
        path = self.folder / f"{rank:05d}.jsonl"
        if not path.exists():
            return
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                self.stat_update("documents")
                yield Document(text=row["text"], id=row["id"], metadata=row.get("metadata", {}))


def reader(folder: Path) -> ShardReader:
    return ShardReader(folder)


def text_row(_writer: Any, doc: Any) -> dict:
    """An output row for pretraining (``map_fn="pretrain"`` reads ``text``)."""
    return {"text": doc.text, "id": doc.id, "source": doc.metadata.get("source")}


def sft_row(_writer: Any, doc: Any) -> dict:
    """An SFT row exactly as it was read."""
    return doc.metadata["row"]


def document_bytes(doc: Any) -> bytes:
    """What exact deduplication compares (after the stages before it, e.g. normalization)."""
    return doc.text.encode("utf-8")


def lsh_threshold(buckets: int, per_bucket: int) -> float:
    """The Jaccard similarity at which a pair becomes a candidate with probability 1/2-ish:
    (1/b)^(1/r), the usual LSH rule of thumb."""
    return (1 / buckets) ** (1 / per_bucket)


def lsh_bands(total: int, threshold: float) -> tuple[int, int]:
    """(buckets, hashes per bucket) splitting ``total`` hashes whose threshold is nearest."""
    splits = [(b, total // b) for b in range(1, total + 1) if total % b == 0]
    return min(splits, key=lambda s: abs(lsh_threshold(*s) - threshold))


def eval_texts(settings: dict[str, Any]) -> list[str]:
    """Every string of the evaluation rows a decontamination stage checks against."""
    texts = []
    if settings.get("tasks"):
        # model-side imports (torch): only the main process building the stage pays them
        from xtuner_lite.evaluation.run import resolve_task
        from xtuner_lite.evaluation.tasks import load_rows

        root = settings.get("data_root") or None
        for task in settings["tasks"]:
            rows = load_rows(resolve_task(task), root)
            texts += [s for row in rows for s in strings_in(row.fields)]
    for name in settings.get("files", ()):
        texts += [s for _, row in read_rows(Path(name)) for s in strings_in(row)]
    return texts


def document_step(stage: StageConfig, out: Path) -> PipelineStep:
    s = stage.settings
    removed = writer(out / REMOVED / stage.label)
    if stage.type == "html_to_text":
        return HtmlToText(**s, exclusion_writer=removed)
    if stage.type == "normalize":
        return Normalize(**s)
    if stage.type == "pii":
        return MaskPII(**s)
    if stage.type == "language":
        return LanguageFilter(list(s.get("languages", ["en"])), s.get("min_score", 0.65), removed)
    if stage.type == "blocklist":
        words = read_words(list(s.get("words", [])), s.get("words_file") or None)
        return BlocklistFilter(words, s.get("max_hits", 0), removed)
    if stage.type == "decontaminate":
        n = s.get("ngram", 13)
        return DecontaminateFilter(eval_grams(eval_texts(s), n), n, s.get("max_hits", 0), removed)
    return QUALITY_FILTERS[stage.type](**s, exclusion_writer=removed)


def minhash_config(settings: dict[str, Any]) -> MinhashConfig:
    buckets, per_bucket = settings.get("buckets", 14), settings.get("hashes_per_bucket", 8)
    if settings.get("threshold"):
        buckets, per_bucket = lsh_bands(buckets * per_bucket, settings["threshold"])
    return MinhashConfig(
        n_grams=settings.get("ngram", 5), num_buckets=buckets, hashes_per_bucket=per_bucket
    )


def dedup_runs(
    stage: StageConfig, source: Path, work: Path, out: Path, tasks: int
) -> tuple[list[Run], PipelineStep]:
    """The runs that find a stage's duplicates over ``source``, and the filter that drops them."""
    folder = work / stage.label
    removed = writer(out / REMOVED / stage.label)
    if stage.type == "exact_dedup":
        config = ExactDedupConfig(content_getter=document_bytes)
        runs = [
            Run(
                f"{stage.label}_signatures",
                [reader(source), ExactDedupSignature(str(folder / "sigs"), config)],
                tasks,
            ),  # fmt: skip
            Run(
                f"{stage.label}_find",
                [ExactFindDedups(str(folder / "sigs"), str(folder / "dups"), config)],
                1,
            ),
        ]
        return runs, ExactDedupFilter(str(folder / "dups"), config, exclusion_writer=removed)
    config = minhash_config(stage.settings)
    runs = [
        Run(f"{stage.label}_signatures",
            [reader(source), MinhashDedupSignature(str(folder / "sigs"), config)], tasks),
        Run(f"{stage.label}_buckets",
            [MinhashDedupBuckets(str(folder / "sigs"), str(folder / "buckets"), config=config)],
            config.num_buckets),
        Run(f"{stage.label}_clusters",
            [MinhashDedupCluster(str(folder / "buckets"), str(folder / "remove"), config=config,
                                 save_cluster_id=True, save_cluster_size=True)], 1),
    ]  # fmt: skip
    return runs, MinhashDedupFilter(str(folder / "remove"), exclusion_writer=removed,
                                    load_cluster_ids=True)  # fmt: skip


def build_runs(cfg: PrepareConfig, errors: Path) -> list[Run]:
    """Every executor run of a config, in order."""
    out, work = cfg.output, cfg.output / WORK
    steps: list[Any] = [RowReader(cfg.data_files, cfg.kind, cfg.text_key, errors)]
    runs: list[Run] = []
    for stage in cfg.stages:
        if stage.type not in DEDUP:
            steps.append(document_step(stage, out))
            continue
        source = work / f"before_{stage.label}"
        runs.append(Run(f"to_{stage.label}", steps + [writer(source)], cfg.tasks))
        found, dedup_filter = dedup_runs(stage, source, work, out, cfg.tasks)
        runs += found
        steps = [reader(source), dedup_filter]
    final = sft_row if cfg.kind == "sft" else text_row
    steps += [writer(out / DATA, adapter=final), writer(work / KEPT)]  # kept: for the report
    runs.append(Run("output", steps, cfg.tasks))
    return runs


class Executor(LocalPipelineExecutor):
    """datatrove's local executor, with each task's console log at ERROR level only (the full log
    is in ``_work/logs``): the CLI prints its own summary."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        return super()._run_for_rank(rank, 1, node_rank)


def run_in_order(
    runs: list[Run], work: Path, errors: Path, executor: Callable[[Run, str], Any]
) -> dict[str, float]:
    """Each run on ``executor(run, logging_dir)``, in order, stopping at the first task error;
    seconds per run."""
    seconds = {}
    for run in runs:
        start = time.perf_counter()
        executor(run, str(work / "logs" / run.name)).run()
        seconds[run.name] = time.perf_counter() - start
        raise_task_errors(errors)
    return seconds


def run_local(runs: list[Run], work: Path, workers: int, errors: Path) -> dict[str, float]:
    """Every run on the local executor, ``workers`` processes."""

    def local(run: Run, logs: str) -> Executor:
        workers_here = min(workers, run.tasks)
        return Executor(run.steps, tasks=run.tasks, workers=workers_here, logging_dir=logs,
                        skip_completed=False)  # fmt: skip

    return run_in_order(runs, work, errors, local)


def run_ray(
    runs: list[Run], work: Path, workers: int, errors: Path, ray: dict[str, Any]
) -> dict[str, float]:
    """Every run on datatrove's Ray executor. Joins the Ray instance already connected, else
    starts one with ``ray["init"]`` (``dict(address="auto")`` joins a running cluster; by default
    a local instance); ``ray["cpus_per_task"]`` and ``ray["mem_per_cpu_gb"]`` size each task."""
    import ray as ray_module  # the ray extra: imported only for this executor

    if not ray_module.is_initialized():
        ray_module.init(**{"include_dashboard": False, "log_to_driver": False,
                           **ray.get("init", {})})  # fmt: skip

    def on_ray(run: Run, logs: str) -> RayPipelineExecutor:
        return RayPipelineExecutor(
            run.steps,
            tasks=run.tasks,
            workers=min(workers, run.tasks),
            logging_dir=logs,
            skip_completed=False,
            cpus_per_task=ray.get("cpus_per_task", 1),
            mem_per_cpu_gb=ray.get("mem_per_cpu_gb", 2),
        )

    return run_in_order(runs, work, errors, on_ray)


def launch_slurm(runs: list[Run], work: Path, slurm: dict[str, Any]) -> list[str]:
    """Submit every run as a Slurm job array, each depending on the one before; job ids.
    The nodes run datatrove's ``launch_pickled_pipeline``: xtuner_lite must be importable there
    (``env_command``, ``venv_path`` or ``condaenv`` in ``run.slurm``)."""
    previous = None
    for run in runs:
        previous = SlurmPipelineExecutor(
            run.steps,
            tasks=run.tasks,
            depends=previous,
            logging_dir=str(work / "logs" / run.name),
            job_name=f"xtuner_prepare_{run.name}",
            skip_completed=False,
            **{"time": "04:00:00", **slurm},
        )
    executors = [previous]
    while executors[-1].depends is not None:
        executors.append(executors[-1].depends)
    previous.run()  # launches the chain, first job first
    return [str(e.job_id) for e in reversed(executors)]


def raise_task_errors(errors: Path) -> None:
    """A task stops at bad input and leaves its error here; the first one is raised."""
    found = sorted(errors.glob("*.txt")) if errors.is_dir() else []
    if found:
        raise XtunerError(found[0].read_text().strip())


def drop_intermediates(cfg: PrepareConfig) -> None:
    """Once the output is written: the copies made before each dedup stage and its signatures
    (each a full pass over the data); logs, kept documents and removals stay."""
    work = cfg.output / WORK
    for stage in cfg.stages:
        if stage.type in DEDUP:
            for folder in (work / f"before_{stage.label}", work / stage.label):
                shutil.rmtree(folder, ignore_errors=True)


MARKER = ".xtuner-prepare"  # written by us alone into every output: the one sign of our folder


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def output_problems(cfg: PrepareConfig, overwrite: bool) -> list[str]:
    """Why ``cfg.output`` may not be written: it is or holds an input, or it holds files we did
    not write (refused, --overwrite or not), or an earlier output and no --overwrite."""
    out = cfg.output.resolve()
    problems = [
        f"output {cfg.output} is or contains the input {f} (inputs.data_files[{i}]); "
        "choose an output folder apart from the inputs"
        for i, f in enumerate(cfg.data_files)
        if _inside(Path(f).resolve(), out)
    ]
    if out.is_file():
        problems.append(f"output {cfg.output} is a file; name a folder")
    elif out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            problems.append(
                f"output folder {cfg.output} is not empty and was not written by `xtuner data "
                f"prepare` (no {MARKER}); nothing in it is deleted: choose another folder"
            )
        elif not overwrite:
            problems.append(
                f"output folder {cfg.output} holds an earlier `xtuner data prepare` output; "
                "--overwrite replaces it (only once the new one is complete)"
            )
        elif cfg.executor == "slurm":
            problems.append(
                f"output folder {cfg.output} holds an earlier output; Slurm jobs write in place "
                "after this command returns, so give a new folder (the old one is kept)"
            )
    return problems


def staging_folder(out: Path) -> Path:
    """A new sibling of ``out`` to build into; it becomes ``out`` only when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.preparing-", dir=out.parent))
    mark_output(staging)
    return staging


def mark_output(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"written_by": "xtuner data prepare"}) + "\n")


def swap_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` (an empty folder, or an earlier output of ours) by the complete
    ``staging`` folder: renames in one file system, the old output deleted last."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        out.replace(old / out.name)
    staging.replace(out)
    if old is not None:
        shutil.rmtree(old)


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False, default=str))
    tmp.replace(path)
