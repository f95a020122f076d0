"""``xtuner eval``: models × tasks → one table (with before/after differences) and a JSON file."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

from rich.console import Console
from rich.table import Table

from xtuner_lite.atomic import write_text
from xtuner_lite.errors import XtunerError
from xtuner_lite.evaluation.bundled import BUILTIN_TASKS, builtin_task
from xtuner_lite.evaluation.evaluator import TaskResult, evaluate_model
from xtuner_lite.evaluation.tasks import TaskSpec, load_spec_file
from xtuner_lite.inference.loader import LoadedModel, load_for_inference
from xtuner_lite.model.build import model_head
from xtuner_lite.values import Flag, NonNegativeInt, PositiveInt

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
    models: Annotated[list[str], Flag(option=True, metavar="MODEL")],
    tasks: Annotated[list[str | dict | TaskSpec], Flag(option=True, metavar="TASK")],
    data_root: str | None = None,
    limit: PositiveInt | None = None,
    seed: int = 0,
    out: str | None = None,
    dtype: str = "float32",
    batch_tokens: PositiveInt = 4096,
    num_fewshot: NonNegativeInt | None = None,
    chat: bool | None = None,
    reward_model: str | None = None,
    show: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, TaskResult]]:
    """Evaluate models on MCQ, generative and perplexity tasks.

    OpenCompass-style evaluation from local files: log-likelihood and circular multiple choice,
    GSM8K-style generation, perplexity. Several models are shown side by side with differences.
    Returns every model's result per task.

    Args:
        models: embedded name, HF folder, merged folder or adapter folder
        tasks: bundled task name or a task .json file
        data_root: folder the bundled tasks' files are relative to (e.g. ../shared/data/eval;
            default $XTUNER_EVAL_DATA)
        limit: score a seeded random subset of N rows per task
        seed: the subset's seed
        out: JSON file for scores and per-sample predictions
        dtype: model dtype (float32, bf16)
        batch_tokens: context tokens per batch
        num_fewshot: override every task's few-shot count
        chat: wrap prompts in the model's chat template (or not), for every task
        reward_model: a reward model (e.g. merged from `xtuner train` with a reward objective)
            that scores every generation task's outputs: mean reward per model, side by side
        show: print the table
        overrides: task settings for every task (Python only; num_fewshot and chat included)
    """
    overrides = {**(overrides or {}), **{k: v for k, v in
                 (("num_fewshot", num_fewshot), ("chat", chat)) if v is not None}}  # fmt: skip
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
        if show:
            print(f"results and per-sample predictions: {out}")
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
