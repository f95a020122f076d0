"""mmengine integration: the SFT model wrapper, CPU autocast, hooks and the runner."""

from xtuner_lite.engine import hooks, optim  # noqa: F401 - register hooks and the optim wrapper
from xtuner_lite.engine.runner import TrainSettings, XtunerRunner, build_runner
from xtuner_lite.engine.sft_model import NonFiniteLossError, SFTModel

__all__ = ["NonFiniteLossError", "SFTModel", "TrainSettings", "XtunerRunner", "build_runner"]
