"""Training on mmengine: the trained model and its one step, hooks, checkpoints, engines and the
runner (what is trained is an objective, ``xtuner_lite.objectives``)."""

from xtuner_lite import name_cpu_accelerator

name_cpu_accelerator()  # before mmengine's optimizer registry imports DeepSpeed

from xtuner_lite.training.runner import TrainSettings, XtunerRunner, build_runner  # noqa: E402
from xtuner_lite.training.step import (  # noqa: E402
    CollapsedRunError,
    NonFiniteLossError,
    TrainingStoppedError,
)
from xtuner_lite.training.train_model import TrainModel  # noqa: E402

__all__ = [
    "CollapsedRunError",
    "NonFiniteLossError",
    "TrainModel",
    "TrainSettings",
    "TrainingStoppedError",
    "XtunerRunner",
    "build_runner",
]
