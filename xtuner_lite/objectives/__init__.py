"""Every training objective by its config name, and the one function that builds them.

One folder (or module) per family, as peft's ``tuners/<method>/``: its objective, its loss and
what it reads — ``sft``, ``preference`` (DPO, ORPO, SimPO, KTO, reward), ``grpo``.
"""

from __future__ import annotations

import inspect
from typing import Any

from xtuner_lite.config import check_kwargs
from xtuner_lite.errors import XtunerError
from xtuner_lite.objectives.base import Metrics, Objective, RunContext, check_settings
from xtuner_lite.objectives.grpo.objective import GRPOObjective
from xtuner_lite.objectives.preference.objective import (
    DPOObjective,
    KTOObjective,
    ORPOObjective,
    RewardObjective,
    SimPOObjective,
)
from xtuner_lite.objectives.sft import ImageSFTObjective, SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "sft": SFTObjective,
    "vlm_sft": ImageSFTObjective,
    "dpo": DPOObjective,
    "orpo": ORPOObjective,
    "simpo": SimPOObjective,
    "kto": KTOObjective,
    "reward": RewardObjective,
    "grpo": GRPOObjective,
}


def build_objective(config: dict[str, Any] | None, chunk_size: int = 1024) -> Objective:
    """The objective of a config's ``objective`` dict (``type`` and the class's settings);
    SFT when there is none. Settings are checked by the class that declares them."""
    config = dict(config or {})
    kind = config.pop("type", "sft")
    if kind not in OBJECTIVES:
        raise XtunerError(f"objective.type must be one of {', '.join(OBJECTIVES)}, got {kind!r}")
    cls = OBJECTIVES[kind]
    check_kwargs(cls, config, f"objective ({kind})")
    if "chunk_size" in inspect.signature(cls).parameters and "chunk_size" not in config:
        config["chunk_size"] = chunk_size
    return cls(**config)


__all__ = [
    "OBJECTIVES",
    "Metrics",
    "Objective",
    "RunContext",
    "build_objective",
    "check_settings",
]
