"""``xtuner contamination``: n-gram overlap of training data with an evaluation task."""

from xtuner_lite.evaluation.contamination import report_contamination as contamination

__all__ = ["contamination"]
