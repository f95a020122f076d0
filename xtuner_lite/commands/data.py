"""``xtuner data prepare`` and ``xtuner data report``: data preparation on datatrove."""

from __future__ import annotations

import sys

from loguru import logger

from xtuner_lite.config import parse_cfg_options
from xtuner_lite.dataprep import load_report, prepare_data, print_report
from xtuner_lite.values import CfgOptions, PositiveInt


def prepare(
    config: str,
    workers: PositiveInt | None = None,
    overwrite: bool = False,
    cfg_options: CfgOptions = None,
) -> None:
    """Run a data-preparation config: clean, filter, deduplicate, decontaminate.

    Data preparation on datatrove: raw text or SFT rows in, clean shards, a manifest and a
    report of what was removed and why out.

    Args:
        config: a config file (see xtuner_lite/configs/prepare)
        workers: worker processes (default: run.workers)
        overwrite: replace an earlier prepare output, once the new one is complete
        cfg_options: override config keys
    """
    logger.remove()  # datatrove's logger: its per-task logs stay in OUT/_work/logs
    logger.add(sys.stderr, level="ERROR")
    prepare_data(config, overrides=parse_cfg_options(cfg_options), workers=workers,
                 overwrite=overwrite)  # fmt: skip


def report(out: str) -> None:
    """Print the report of a prepared output folder again.

    Args:
        out: the output folder of `xtuner data prepare`
    """
    print_report(load_report(out))


__all__ = ["prepare", "report"]
