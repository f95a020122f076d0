"""A training work dir: what marks one, one training in it at a time, nothing replaced silently."""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from xtuner_lite.atomic import remove
from xtuner_lite.errors import XtunerError

# the names a training writes into its work dir, named once
FILENAME = "iter_{}.pth"  # a checkpoint after that many optimizer steps
DIVERGED_SUFFIX = ".diverged"  # a checkpoint set aside: its weights diverged
LAST_CHECKPOINT = "last_checkpoint"
LOCK = ".xtuner_lite.lock"
LOSS_LOG = "loss.jsonl"
DATA_REPORT = "dataset_stats.json"
RESULT_FOLDERS = ("adapter", "model")
# what a run writes that a new run from scratch would mix with its own
RUN_FILES = (LOSS_LOG, "samples.jsonl", "eval.jsonl", LAST_CHECKPOINT, DATA_REPORT)
_CHECKPOINT = re.compile(r"^iter_(\d+)\.pth$")


class WorkDirError(XtunerError):
    """A work dir that cannot be used as asked (busy, holding a run, not a writable folder)."""


def checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``iter_N.pth`` in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), path) for path in folder.iterdir() if (m := _CHECKPOINT.match(path.name))
    ]
    return sorted(found)


def left_by_a_run(folder: str | Path) -> list[str]:
    """What a training left in ``folder``: checkpoints, logs, the result (empty: nothing)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [path.name for _, path in checkpoints(folder)]
    found += [name for name in (*RUN_FILES, *RESULT_FOLDERS, LOCK) if (folder / name).exists()]
    return found


def is_work_dir(folder: str | Path) -> bool:
    return bool(left_by_a_run(folder))


def check_writable(folder: Path) -> None:
    """Create ``folder`` (and parents) or say why it cannot be a work dir."""
    if folder.exists() and not folder.is_dir():
        raise WorkDirError(f"work dir {folder} is a file, not a folder; choose another --work-dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkDirError(f"cannot create work dir {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WorkDirError(f"work dir {folder} is not writable; choose another --work-dir")


def clear_previous_run(folder: Path) -> None:
    """``--overwrite``: remove what a previous run left that a new one would mix with (its
    checkpoints, curves and data report); logs stay, the result is replaced at the end."""
    for _, path in checkpoints(folder):
        remove(path)
    for path in folder.glob(f"iter_*.pth{DIVERGED_SUFFIX}"):
        remove(path)
    for name in RUN_FILES:
        remove(folder / name)


def check_start(folder: Path, resume: bool | str, overwrite: bool) -> None:
    """Refuse to start over a previous run unless asked to resume it or to overwrite it."""
    if resume or overwrite:
        return
    previous = [
        name
        for name in left_by_a_run(folder)
        if name not in (LOCK, DATA_REPORT, "samples.jsonl", "eval.jsonl")
    ]
    if previous:
        shown = ", ".join(previous[:4]) + (" ..." if len(previous) > 4 else "")
        raise WorkDirError(
            f"work dir {folder} holds a previous run ({shown}); pass "
            "--resume auto to continue it, --overwrite to start over in it, or "
            "choose another --work-dir"
        )


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the work dir for this training: a second one in it fails at once, naming it."""
    handle: IO[str] = open(folder / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise WorkDirError(
                f"work dir {folder} is in use by another training (pid {owner}); "
                "wait for it to finish or choose another --work-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock; a killed process releases it too
