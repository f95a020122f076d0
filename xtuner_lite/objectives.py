"""Every training objective by its config name, and the one function that builds them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from xtuner_lite.alignment.objectives import OBJECTIVES as PREFERENCE_OBJECTIVES
from xtuner_lite.alignment.objectives import PreferenceObjective
from xtuner_lite.config import check_kwargs
from xtuner_lite.data.pipeline import process_dataset
from xtuner_lite.data.preference import process_preference_dataset
from xtuner_lite.engine.objectives import Objective
from xtuner_lite.errors import XtunerError
from xtuner_lite.rl.data import process_prompt_dataset
from xtuner_lite.rl.objective import GRPOObjective

OBJECTIVES: dict[str, type[Objective]] = {**PREFERENCE_OBJECTIVES, "grpo": GRPOObjective}


def build_objective(config: dict[str, Any] | None, chunk_size: int = 1024) -> Objective | None:
    """The objective of a config's ``objective`` dict (``type``, the class's settings and, for
    objectives with a reference model, ``precompute_reference``); None for SFT."""
    if not config:
        return None
    config = dict(config)
    kind = config.pop("type", None)
    precompute = config.pop("precompute_reference", False)
    if kind in (None, "sft"):
        return None
    if kind not in OBJECTIVES:
        raise XtunerError(
            f"objective.type must be one of sft, {', '.join(OBJECTIVES)}, got {kind!r}"
        )
    cls = OBJECTIVES[kind]
    check_kwargs(cls, config, f"objective ({kind})")
    if "chunk_size" in inspect.signature(cls).parameters and "chunk_size" not in config:
        config["chunk_size"] = chunk_size
    objective = cls(**config)
    if precompute and not getattr(objective, "needs_reference", False):
        raise XtunerError(f"objective.precompute_reference: {kind} uses no reference model")
    if precompute:
        objective.precompute_reference = True
    return objective


def dataset_function(objective: Objective | None) -> Callable:
    """What reads an objective's ``train_dataset`` (its keys are this function's arguments)."""
    if isinstance(objective, PreferenceObjective):
        return process_preference_dataset
    if isinstance(objective, GRPOObjective):
        return process_prompt_dataset
    return process_dataset


__all__ = ["OBJECTIVES", "build_objective", "dataset_function"]
