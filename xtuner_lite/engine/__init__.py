"""mmengine integration: the trained model and its step, objectives, hooks and the runner."""

from xtuner_lite.deepspeed_env import name_cpu_accelerator

name_cpu_accelerator()  # before mmengine's optimizer registry imports DeepSpeed

from xtuner_lite.engine.objectives import NextTokenObjective, Objective  # noqa: E402
from xtuner_lite.engine.runner import TrainSettings, XtunerRunner, build_runner  # noqa: E402
from xtuner_lite.engine.step import (  # noqa: E402
    CollapsedRunError,
    NonFiniteLossError,
    TrainingStoppedError,
)
from xtuner_lite.engine.train_model import TrainModel  # noqa: E402

__all__ = [
    "CollapsedRunError",
    "NextTokenObjective",
    "NonFiniteLossError",
    "Objective",
    "TrainModel",
    "TrainSettings",
    "TrainingStoppedError",
    "XtunerRunner",
    "build_runner",
]
