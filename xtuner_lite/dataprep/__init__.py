"""Data preparation (``xtuner data prepare``): clean, filter, deduplicate and decontaminate raw
text and SFT rows on datatrove, with a report of what was removed and why."""

from xtuner_lite.dataprep.config import load_prepare_config
from xtuner_lite.dataprep.prepare import load_report, prepare
from xtuner_lite.dataprep.report import print_report

__all__ = ["load_prepare_config", "load_report", "prepare", "print_report"]
