"""Scoring tasks during training: an mmengine hook over the evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from xtuner_lite.evaluation.evaluator import evaluate_model
from xtuner_lite.evaluation.run import resolve_task
from xtuner_lite.inference.loader import LoadedModel
from xtuner_lite.training.hooks import PeriodicHook
from xtuner_lite.training.progress import say


class EvaluateTasksHook(PeriodicHook):
    """Scores a small task set (``xtuner eval`` tasks, usually with a ``limit``) before training,
    every ``every`` steps and at the end; logs ``eval/<task>/<metric>`` scalars and appends to
    ``eval.jsonl``. Scoring draws no random numbers, so an exact resume is undisturbed."""

    priority = "LOW"

    def __init__(
        self,
        tokenizer,
        template,
        tasks: list,
        every: int | None = None,
        data_root: str | None = None,
        limit: int | None = None,
        seed: int = 0,
    ):
        self.tokenizer, self.template = tokenizer, template
        self.specs = [resolve_task(t) for t in tasks]  # a bad task fails before training starts
        self.every, self.data_root, self.limit, self.seed = every, data_root, limit, seed

    @torch.no_grad()
    def _run(self, runner, when: str) -> None:
        llm = runner.model.llm
        was_training = llm.training
        llm.eval()
        model = LoadedModel("training", llm, self.tokenizer, self.template)
        with runner.optim_wrapper.optim_context(runner.model):  # training's autocast
            results = evaluate_model(model, self.specs, self.data_root, self.limit, self.seed)
        llm.train(was_training)
        record = {"step": runner.iter, "when": when}
        for task, result in results.items():
            for metric, value in result.metrics.items():
                runner.message_hub.update_scalar(f"eval/{task}/{metric}", value)
            record[task] = {**result.metrics, "n": result.n}
            scores = ", ".join(f"{m} {v:.4f}" for m, v in result.metrics.items())
            line = f"[eval {when}] {task} (n={result.n}): {scores}"
            runner.logger.info(line)
            say(line)
        with open(Path(runner.work_dir) / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
