"""One optimizer step, written out once for every engine.

The micro-batch loop, the normalization over the global batch, backward, the skipped gradient
all-reduce on all but the last micro-batch, clipping and the optimizer step (inside the optim
wrapper), and the non-finite check. One process, DDP, DeepSpeed ZeRO and FSDP2 differ only in
the :class:`Accumulation` they pass (in the spirit of litgpt's ``fabric.no_backward_sync``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper

from xtuner_lite.errors import XtunerError
from xtuner_lite.model.sequence_parallel import replicas
from xtuner_lite.objectives.base import Objective
from xtuner_lite.training.distributed import global_sum, world
from xtuner_lite.training.optim import ScaledOptimWrapper

Batch = dict[str, torch.Tensor]


class TrainingStoppedError(XtunerError):
    """Training cannot go on from this step; the checkpoints from before it are kept."""


class NonFiniteLossError(TrainingStoppedError):
    """A step's loss is NaN or inf."""


class CollapsedRunError(TrainingStoppedError):
    """The model predicts the uniform distribution and gets no gradient: the weights were
    destroyed (typically by far too high a learning rate) without any NaN."""


# the scale halves on each skipped step: from GradScaler's 65536, 20 in a row reach 1/16, which
# no fp16 overflow needs; NaNs that survive that come from the weights, not the scale
MAX_SKIPPED_IN_A_ROW = 20


def _no_skip(skip: bool) -> AbstractContextManager:
    return nullcontext()


@dataclass
class Accumulation:
    """How an engine runs micro-batches.

    ``forward``: the (wrapped) model's forward, so DDP, DeepSpeed and FSDP2 can hook it.
    ``no_backward_sync(skip)``: a context in which backward does not all-reduce gradients when
    ``skip`` (every micro-batch but the last).
    ``engine_steps``: the engine counts micro-batches and steps at the boundary itself
    (DeepSpeed): its ``step()`` is called after every backward.
    """

    forward: Callable[[Batch], torch.Tensor]
    no_backward_sync: Callable[[bool], AbstractContextManager] = _no_skip
    engine_steps: bool = False


def optimizer_step(
    model: torch.nn.Module,
    objective: Objective,
    data: list[Batch],
    optim_wrapper: OptimWrapper,
    acc: Accumulation,
) -> dict[str, torch.Tensor]:
    """One optimizer step over this process's micro-batches ``data``.

    Each micro-batch's loss sum is scaled by world / (global units): the engines average
    gradients over the world, which makes the result the global per-unit mean, as one big
    batch would give (unlike averaging per-micro-batch means, transformers#34191).
    Under sequence parallelism every rank of a group holds the group's batch and its loss
    (each back-propagating it through its own positions), so global sums count it
    ``replicas()`` times.
    """
    _, world_size = world()
    copies = replicas()
    total = max(global_sum(sum(objective.units(b) for b in data))[0] / copies, 1)
    loss_value = 0.0
    for i, batch in enumerate(data):
        with acc.no_backward_sync(i < len(data) - 1):
            with optim_wrapper.optim_context(model):
                loss = acc.forward(batch)
            optim_wrapper.backward(loss * (world_size / total))
        loss_value += float(loss.detach())
        if acc.engine_steps:
            optim_wrapper.step()
    tokens = sum(int(b["num_tokens"]) for b in data)  # real tokens, padding excluded
    loss_value, tokens = (v / copies for v in global_sum(loss_value, tokens))
    loss_value /= total
    scaled = isinstance(optim_wrapper, ScaledOptimWrapper)
    if not acc.engine_steps:
        if math.isfinite(loss_value) or not scaled:  # fp16 overflow: the scaler skips the step
            check_progress(loss_value, model, objective, optim_wrapper)
        optim_wrapper.step()
        optim_wrapper.zero_grad()
        if scaled:
            check_loss_scale(optim_wrapper, loss_value)
    elif not math.isfinite(loss_value):
        raise _non_finite(loss_value)
    scale = {"loss_scale": torch.tensor(optim_wrapper.loss_scaler.get_scale())} if scaled else {}
    return {
        "loss": torch.tensor(loss_value),
        "tokens": torch.tensor(float(tokens)),
        **scale,
        **_logged(objective),
    }


def train_step(
    model: torch.nn.Module,
    objective: Objective,
    data: list[Any],
    optim_wrapper: OptimWrapper,
    acc: Accumulation,
) -> dict[str, torch.Tensor]:
    """One loader batch: the objective's micro-batches from it (rollouts for RL), then
    ``objective.updates`` optimizer steps on them; the log of the last step (with what only the
    first logs, such as rollout statistics)."""
    step = MessageHub.get_current_instance().get_info("iter", 0)
    # under training's autocast: rollouts and old log-probs see the precision the updates see
    with optim_wrapper.optim_context(model):
        batches = objective.prepare(getattr(model, "llm", model), data, step)
    logged: dict[str, torch.Tensor] = {}
    for _ in range(objective.updates):
        start = time.perf_counter()
        logged.update(optimizer_step(model, objective, batches, optim_wrapper, acc))
        if objective.samples_own_data:
            seconds = time.perf_counter() - start
            logged["train_tokens_per_s"] = logged["tokens"] / max(seconds, 1e-9)
    return logged


def _logged(objective: Objective) -> dict[str, torch.Tensor]:
    """The objective's metrics, summed over ranks: sum / count each."""
    metrics = objective.take_metrics()
    if not metrics:
        return {}
    names = sorted(metrics)
    sums = global_sum(*(v for n in names for v in metrics[n]))
    return {
        n: torch.tensor(sums[2 * i] / sums[2 * i + 1])
        for i, n in enumerate(names)
        if sums[2 * i + 1]
    }


def check_progress(
    loss: float, model: torch.nn.Module, objective: Objective, optim_wrapper: OptimWrapper
) -> None:
    """Refuse to step on a NaN/inf loss or a collapsed model (the gradients are dropped)."""
    if not math.isfinite(loss):
        optim_wrapper.zero_grad()
        raise _non_finite(loss)
    degenerate = objective.degenerate_loss(getattr(model, "llm", model))
    if degenerate is not None and _collapsed(loss, degenerate, model):
        optim_wrapper.zero_grad()
        raise CollapsedRunError(
            f"the model collapsed: loss {loss:.4f} = {degenerate:.4f}, the "
            f"{objective.name} loss of a model that has lost its weights, "
            "with a zero gradient (usually from too high a learning rate); "
            "training stopped"
        )


def check_loss_scale(optim_wrapper: ScaledOptimWrapper, loss: float) -> None:
    """fp16 skips a step whose gradients overflow and halves the loss scale; a run that skips
    ``MAX_SKIPPED_IN_A_ROW`` steps in a row has diverged, not overflowed."""
    skipped = optim_wrapper.skipped_in_a_row
    if skipped and world()[0] == 0:
        print(f"fp16: gradients overflowed (loss {loss:.4g}); step skipped, loss scale now "
              f"{optim_wrapper.loss_scaler.get_scale():g}", flush=True)  # fmt: skip
    if skipped >= MAX_SKIPPED_IN_A_ROW:
        raise NonFiniteLossError(
            f"fp16: {skipped} steps in a row overflowed (loss {loss}) although the loss scale "
            f"fell to {optim_wrapper.loss_scaler.get_scale():g}; training stopped (lower the "
            "learning rate, or check the data with `xtuner check-dataset`)"
        )


def _non_finite(loss: float) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"loss is {loss}; training stopped (lower the learning rate, or "
        "check the data with `xtuner check-dataset`)"
    )


def _collapsed(loss: float, degenerate: float, model: torch.nn.Module) -> bool:
    """The loss of a destroyed model with an all-zero gradient."""
    if abs(loss - degenerate) > 1e-3 * abs(degenerate):
        return False
    return all(
        p.grad is None or not bool(p.grad.abs().max() > 0)
        for p in model.parameters()
        if p.requires_grad
    )


__all__ = [
    "Accumulation",
    "CollapsedRunError",
    "NonFiniteLossError",
    "TrainingStoppedError",
    "optimizer_step",
    "train_step",
]
