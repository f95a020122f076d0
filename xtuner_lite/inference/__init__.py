"""Generation: the bundled continuous-batching engine and its sampling rules."""

from xtuner_lite.inference.engine import InferenceEngine, Request
from xtuner_lite.inference.sampling import SamplingParams

__all__ = ["InferenceEngine", "Request", "SamplingParams"]
