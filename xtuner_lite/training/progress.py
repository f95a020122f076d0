"""What the terminal shows while training: a live bar on a terminal, plain lines otherwise.

mmengine's console output (environment dump, config, hook table, per-step lines) goes to the
log file in the work dir instead (``--verbose`` prints it too); warnings still print.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta

import torch
from mmengine.hooks import Hook
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from xtuner_lite.resources import peak_rss_bytes

# mmengine warnings about its own internals, which a user cannot act on
NOISE = ("has no metainfo", '"FileClient" will be deprecated', '"HardDiskBackend" is the alias')


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in NOISE)


def quiet_console(logger: logging.Logger, verbose: bool) -> None:
    """mmengine's console handler shows warnings only (everything with ``verbose``); its file
    handler keeps the whole log."""
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
            handler.addFilter(_DropNoise())


def say(text: str) -> None:
    """A line for the user, above the live bar when there is one."""
    Console(file=sys.stdout, highlight=False, soft_wrap=True).print(text, markup=False)


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_bytes() / 2**30


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class ProgressHook(Hook):
    """Step/total, loss, lr, tokens/s, ETA and peak memory: a rich bar on a terminal, one
    line every ``log_interval`` steps when the output is a file or a pipe (rank 0 only)."""

    priority = "BELOW_NORMAL"  # after the throughput hook has measured the step

    def __init__(self, log_interval: int = 1, device: str = "cpu", console: Console | None = None):
        self.log_interval, self.device = log_interval, device
        self.console = console or Console(file=sys.stdout, highlight=False)
        self._bar: Progress | None = None

    def before_train(self, runner) -> None:
        if runner.rank != 0:
            return
        self._total, self._first = runner.max_iters, runner.iter
        self._start = time.perf_counter()
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn(
                    "loss {task.fields[loss]}  lr {task.fields[lr]}  "
                    "{task.fields[speed]} tok/s  eta {task.fields[eta]}  "
                    "peak {task.fields[memory]}"
                ),
                console=self.console,
                transient=False,
            )
            self._task = self._bar.add_task(
                "train",
                total=self._total,
                completed=runner.iter,
                loss="-",
                lr="-",
                speed="-",
                eta="-",
                memory="-",
            )
            self._bar.start()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if runner.rank != 0:
            return
        step = runner.iter + 1
        fields = self._fields(runner, step, outputs)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, **fields)
        elif step % self.log_interval == 0 or step == self._total:
            extra = "".join(
                f"  {k} {float(v):.4f}" for k, v in outputs.items() if k not in ("loss", "tokens")
            )
            self.console.print(
                f"step {step}/{self._total}  loss {fields['loss']}{extra}  "
                f"lr {fields['lr']}  {fields['speed']} tok/s  "
                f"eta {fields['eta']}  peak {fields['memory']}",
                markup=False,
            )

    def _fields(self, runner, step: int, outputs) -> dict[str, str]:
        elapsed = time.perf_counter() - self._start
        speed = runner.message_hub.get_scalar("train/tokens_per_sec").current()
        remaining = elapsed / max(step - self._first, 1) * (self._total - step)
        return {
            "loss": f"{float(outputs['loss']):.4f}",
            "lr": f"{runner.optim_wrapper.get_lr()['lr'][0]:.2e}",
            "speed": f"{speed:,.0f}",
            "eta": _eta(remaining),
            "memory": f"{peak_memory_gib(self.device):.2f} GiB",
        }

    def after_train(self, runner) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live bar (also when training stopped with an error)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


__all__ = ["ProgressHook", "quiet_console", "say"]
