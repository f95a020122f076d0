"""Data preparation (``xtuner data prepare``): clean, filter, deduplicate and decontaminate raw
text and SFT rows on datatrove, with a report of what was removed and why."""

from xtuner_lite.dataprep.prepare import load_report, prepare
from xtuner_lite.dataprep.settings import load_prepare_config
from xtuner_lite.dataprep.summary import print_report

prepare_data = prepare  # the name `xtuner_lite` exports it under

__all__ = ["load_prepare_config", "load_report", "prepare", "prepare_data", "print_report"]
