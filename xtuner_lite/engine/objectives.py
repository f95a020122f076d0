"""Training objectives: what a micro-batch's loss is and what the step normalizes it by.

A new training mode is a new objective (and a config), not a new route through the engines:
``engine/step.py`` runs every objective the same way on one process, DDP, DeepSpeed and FSDP2.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from xtuner_lite.model.forward import count_trained, loss_sum


class Objective(ABC):
    """Turns one micro-batch into a loss *sum*; the step divides it by the global count of
    :meth:`units` (over every micro-batch and rank), so accumulation equals one big batch."""

    name: str = "objective"
    unit: str = "units"  # what the loss is normalized by, for messages
    updates: int = 1  # optimizer steps on each loader batch (RL reuses its rollouts)
    samples_own_data: bool = False  # RL: prepare() generates the training data

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
        """What to log besides the loss, as (sum, count) per name, accumulated over the
        micro-batches since the last call (the step sums them over ranks and divides)."""
        return {}


class NextTokenObjective(Objective):
    """Supervised fine-tuning and continued pretraining: cross-entropy summed over the trained
    tokens (labels != -100), normalized by the trained tokens of the global batch."""

    name = "sft"
    unit = "trained tokens"

    def __init__(self, chunk_size: int = 1024):
        self.chunk_size = chunk_size

    def loss_sum(self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(llm, batch, self.chunk_size)[0]

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_trained(batch)

    def degenerate_loss(self, llm: torch.nn.Module) -> float | None:
        """ln V: every token equally likely."""
        vocab_size = getattr(getattr(llm, "config", None), "vocab_size", None)
        return math.log(vocab_size) if vocab_size else None


__all__ = ["NextTokenObjective", "Objective"]
