"""``xtuner eval``: OpenCompass-style evaluation (``xtuner_lite.evaluation``)."""

from xtuner_lite.evaluation import run_eval as evaluate

__all__ = ["evaluate"]
