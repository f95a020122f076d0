"""``xtuner eval``: models × tasks → one table (with before/after differences) and a JSON file."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from xtuner_lite.atomic import write_text
from xtuner_lite.errors import XtunerError
from xtuner_lite.evaluation.builtin import BUILTIN_TASKS, builtin_task
from xtuner_lite.evaluation.evaluator import TaskResult, evaluate_model
from xtuner_lite.evaluation.tasks import TaskSpec, load_spec_file
from xtuner_lite.inference.loader import LoadedModel, load_for_inference
from xtuner_lite.model.build import model_head

MAIN_METRIC = ("circular_acc", "acc_norm", "acc", "perplexity")


def resolve_task(ref: str | dict | TaskSpec) -> TaskSpec:
    """A bundled task name, a task ``.json`` file, or a spec dict."""
    if isinstance(ref, TaskSpec):
        return ref
    if isinstance(ref, dict):
        return TaskSpec.from_dict(ref)
    if ref.endswith(".json") or os.path.exists(ref):
        return load_spec_file(ref)
    spec = builtin_task(ref)
    if spec is None:
        close = difflib.get_close_matches(ref, BUILTIN_TASKS, 1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise XtunerError(
            f"unknown task {ref!r}{hint} (bundled: {', '.join(BUILTIN_TASKS)}; "
            "or pass a task .json file)"
        )
    return spec


def load_for_eval(ref: str, dtype: str = "float32") -> LoadedModel:
    """A model name or folder, a merged folder, or an adapter folder (on its recorded base);
    a base model without a chat template is scored on raw prompts."""
    return load_for_inference(ref, dtype=dtype, check_base=True, template_required=False)


def main_metric(result: TaskResult) -> str:
    return next(m for m in MAIN_METRIC if m in result.metrics)


def run_eval(
    models: list[str],
    tasks: list[str | dict | TaskSpec],
    data_root=None,
    limit: int | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    dtype: str = "float32",
    batch_tokens: int = 4096,
    show: bool = True,
    overrides: dict[str, Any] | None = None,
    reward_model: str | None = None,
) -> dict[str, dict[str, TaskResult]]:
    """Evaluate every model on every task; print the table; write ``out`` (JSON) if given.
    ``overrides`` set spec fields for every task (e.g. ``num_fewshot``, ``chat``);
    ``reward_model`` scores each generation task's outputs (a ``reward`` metric)."""

    specs = [resolve_task(t) for t in tasks]
    if overrides:
        specs = [dataclasses.replace(s, **overrides) for s in specs]
    results: dict[str, dict[str, TaskResult]] = {}
    timing = {}
    scorer = load_for_eval(reward_model, dtype) if reward_model else None
    if scorer is not None and model_head(scorer.model) != "reward":
        raise XtunerError(f"--reward-model {reward_model} is not a reward model")
    for ref in models:
        model = load_for_eval(ref, dtype)
        start = time.perf_counter()
        results[ref] = evaluate_model(
            model, specs, data_root, limit, seed, batch_tokens, reward_model=scorer
        )
        timing[ref] = time.perf_counter() - start
        del model
    if show:
        print_table(results)
    if out is not None:
        write_results(
            results,
            out,
            {
                "limit": limit,
                "seed": seed,
                "dtype": dtype,
                "data_root": str(data_root),
                "seconds": timing,
                "tasks": [vars(s) for s in specs],
            },
        )
    return results


def write_results(results: dict[str, dict[str, TaskResult]], out, config: dict[str, Any]) -> None:
    payload = {
        "config": config,
        "results": {
            model: {
                name: {
                    "metrics": r.metrics,
                    "n": r.n,
                    "ci95": {m: r.interval(m) for m in r.metrics if "acc" in m},
                    "subjects": r.subjects,
                    "samples": r.samples,
                }
                for name, r in by_task.items()
            }
            for model, by_task in results.items()
        },
    }
    write_text(out, json.dumps(payload, indent=1, ensure_ascii=False))


def print_table(results: dict[str, dict[str, TaskResult]]) -> None:
    """Tasks × metrics as rows, models as columns; with two or more models, the change from
    the first (e.g. before fine-tuning) to each later one."""

    models = list(results)
    table = Table(title="xtuner eval")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("n", justify="right")
    for model in models:
        table.add_column(Path(model).name or model, justify="right")
    for model in models[1:]:
        table.add_column(f"Δ {Path(model).name or model}", justify="right")
    first = results[models[0]]
    for task, result in first.items():
        for metric in result.metrics:
            values = [results[m][task].metrics.get(metric) for m in models]
            scale = 100 if "acc" in metric else 1
            cells = [
                f"{v * scale:.2f}"
                + (
                    f" ±{results[m][task].interval(metric) * 100:.1f}"
                    if "acc" in metric and metric != "subject_avg_acc"
                    else ""
                )
                for m, v in zip(models, values)
            ]
            deltas = [f"{(v - values[0]) * scale:+.2f}" for v in values[1:]]
            table.add_row(task, metric, str(result.n), *cells, *deltas)
    Console().print(table)
