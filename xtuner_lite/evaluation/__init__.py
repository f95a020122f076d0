"""The bundled evaluator: multiple choice (log-likelihood, circular), generation, perplexity."""

from xtuner_lite.evaluation.evaluator import LoadedModel, TaskResult, evaluate_model
from xtuner_lite.evaluation.loglik import LoglikScorer
from xtuner_lite.evaluation.run import load_for_eval, resolve_task, run_eval
from xtuner_lite.evaluation.tasks import TaskSpec

__all__ = [
    "LoadedModel",
    "LoglikScorer",
    "TaskResult",
    "TaskSpec",
    "evaluate_model",
    "load_for_eval",
    "resolve_task",
    "run_eval",
]
