"""Atomic writes: a file or folder appears under its final name complete, or not at all.

Everything xtuner_lite writes that a user keeps (checkpoints, adapters, merged models, GGUF files,
results) is written under a hidden ``.NAME.partial`` beside the target and renamed into place, so
a kill mid-write never leaves half a file under a real name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_path(target: str | os.PathLike) -> Path:
    """Where ``target`` is written before it is complete: ``.NAME.partial`` beside it."""
    target = Path(target)
    return target.with_name(f".{target.name}.partial")


def remove(path: str | os.PathLike) -> None:
    """Remove a file or a folder, if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a finished ``tmp`` into ``target``'s place (a folder target is replaced whole)."""
    tmp, target = Path(tmp), Path(target)
    if target.is_dir() and not target.is_symlink():
        # a folder cannot be replaced in one rename: move the old one aside first, so that a
        # kill between the two renames leaves both complete copies on disk
        old = target.with_name(f".{target.name}.old")
        remove(old)
        os.replace(target, old)
        os.replace(tmp, target)
        remove(old)
    else:
        os.replace(tmp, target)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``target`` to (a file or a folder); on success it is
    renamed to ``target``, on error it is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(target)
    remove(tmp)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    publish(tmp, target)


def write_text(target: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)
