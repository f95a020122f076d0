"""The one objective concept: what a training mode reads, builds, needs and computes.

A new training mode is a new objective (and a config), not a new route through the engines:
``training/step.py`` runs every objective the same way on one process, DDP, DeepSpeed and FSDP2,
and ``xtuner train``, ``plan`` and ``check-dataset`` ask the objective whatever differs between
modes (its data, its model head, its reference, its engines, its memory-plan inputs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from xtuner_lite.config import check_kwargs
from xtuner_lite.data.report import report_skips, write_report
from xtuner_lite.errors import XtunerError
from xtuner_lite.workdir import DATA_REPORT


def check_settings(checks: list[tuple[bool, str]]) -> None:
    """Raise once, naming every ``objective.<setting>`` that is wrong."""
    problems = [f"objective.{message}" for ok, message in checks if not ok]
    if problems:
        raise XtunerError("; ".join(problems))


class Metrics:
    """What an objective logs besides the loss, as (sum, count) per name, accumulated over the
    micro-batches since the last :meth:`take` (the step sums them over ranks and divides)."""

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(self, name: str, values: torch.Tensor) -> None:
        self._sums[name][0] += float(values.sum())
        self._sums[name][1] += values.numel()

    def take(self) -> dict[str, tuple[float, float]]:
        taken = {k: (v[0], v[1]) for k, v in self._sums.items()}
        self._sums.clear()
        return taken


@dataclass
class RunContext:
    """What an objective's :meth:`Objective.set_up` may use of the run ``xtuner train`` built."""

    llm: torch.nn.Module
    dataset: Any
    tokenizer: Any
    template: Any
    seed: int
    rank: int
    work_dir: Path | None
    pad: int
    make_reference: Callable[[], Any]  # a Reference: the adapter-disabled model, or a frozen copy
    rank_zero_first: Callable[[], AbstractContextManager]  # rank 0 writes a cache, others read it
    device: str
    autocast: torch.dtype | None
    batch_size: int
    cache_key: tuple  # what a cached reference depends on besides the data (model, dtype)


class Objective(ABC):
    """Turns one micro-batch into a loss *sum*; the step divides it by the global count of
    :meth:`units` (over every micro-batch and rank), so accumulation equals one big batch."""

    name: str = "objective"
    unit: str = "units"  # what the loss is normalized by, for messages
    updates: int = 1  # optimizer steps on each loader batch (RL reuses its rollouts)
    samples_own_data: bool = False  # RL: prepare() generates the training data
    data_kind: str = "sft"  # what check-dataset shows: sft | images | pairs | unpaired | prompts
    reader: Callable[..., Any]  # reads train_dataset; its keyword arguments are the config keys
    # what makes the loss depend on how a batch is split into micro-batches (None: nothing, so
    # accumulation equals one big batch exactly)
    batch_statistic: str | None = None

    def __init__(self, chunk_size: int = 1024):
        self.chunk_size = chunk_size
        self.metrics = Metrics()

    # ------------------------------------------------------------------ before the run
    def data_settings(self, data_cfg: dict[str, Any]) -> dict[str, Any]:
        """The ``train_dataset`` settings this objective reads, checked against its reader."""
        check_kwargs(self.reader, data_cfg, "train_dataset")
        return data_cfg

    def model_settings(self) -> dict[str, Any]:
        """What the objective sets in ``model`` (a reward model's scalar head)."""
        return {}

    def engine_problem(
        self, deepspeed: Any, fsdp: bool, sequence_parallel_size: int = 1
    ) -> str | None:
        """Why this objective cannot run on the chosen engine (None: it can)."""
        return None

    def plan_settings(self, method: str, data_cfg: dict, train_cfg: dict) -> dict[str, Any]:
        """The memory planner's inputs that follow from this objective (``PlanSettings`` keys)."""
        return {"max_length": int(data_cfg.get("max_length", 2048))}

    # ------------------------------------------------------------------ set-up
    def load_dataset(self, data_cfg: dict[str, Any], tokenizer: Any, template: Any) -> Any:
        """The training dataset, rendered with exactly the template recorded with the result."""
        processed = self.reader(**{**data_cfg, "tokenizer": tokenizer, "template": template})
        return self.dataset_class(processed.data, processed.stats)

    def report_data(self, dataset: Any, work_dir: Path) -> None:
        """What was skipped or truncated (as check-dataset counts it), printed and saved."""
        report_skips(dataset.stats, Console(), examples=3)
        write_report(dataset.stats, work_dir / DATA_REPORT)

    def set_up(self, run: RunContext) -> None:
        """What the objective needs of the built run (a reference, the tokenizer)."""
        return None

    # ------------------------------------------------------------------ the step
    def prepare(self, llm: torch.nn.Module, data: list[Any], step: int) -> list[Any]:
        """The micro-batches to train on from the loader's (RL: rollouts from the policy)."""
        return data

    @abstractmethod
    def loss_sum(self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the per-unit losses of one micro-batch (a scalar with a graph)."""

    @abstractmethod
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units (trained tokens, pairs, sequences) the micro-batch holds."""

    def degenerate_loss(self, llm: torch.nn.Module) -> float | None:
        """The loss of a model whose weights were destroyed (None: no such value): with a
        zero gradient it stops training instead of stepping on."""
        return None

    def take_metrics(self) -> dict[str, tuple[float, float]]:
        """The metrics since the last call (see :class:`Metrics`)."""
        return self.metrics.take()


__all__ = ["Metrics", "Objective", "RunContext", "check_settings"]
