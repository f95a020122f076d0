"""mmengine integration: the SFT model wrapper, CPU autocast, hooks and the runner."""

from xtuner_lite.deepspeed_env import name_cpu_accelerator

name_cpu_accelerator()  # before mmengine's optimizer registry imports DeepSpeed

from xtuner_lite.engine import hooks, optim  # noqa: E402, F401 - register hooks, optim wrapper
from xtuner_lite.engine.runner import TrainSettings, XtunerRunner, build_runner  # noqa: E402
from xtuner_lite.engine.sft_model import (  # noqa: E402
    CollapsedRunError,
    NonFiniteLossError,
    SFTModel,
    TrainingStoppedError,
)

__all__ = ["CollapsedRunError", "NonFiniteLossError", "SFTModel", "TrainSettings",
           "TrainingStoppedError", "XtunerRunner", "build_runner"]
