"""``xtuner copy-cfg``: a bundled config (and its ``_base_``) copied out to edit."""

from __future__ import annotations

import shutil
from pathlib import Path

from xtuner_lite.config import find_config
from xtuner_lite.errors import XtunerError


def copy_cfg(name: str, dest: str) -> Path:
    """Copy a bundled config (and its _base_) to edit it.

    Args:
        name: a bundled config's name (see `xtuner list-cfg`)
        dest: folder to copy into
    """
    src = find_config(name)
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / src.name
    if target.exists():
        raise XtunerError(f"{target} exists; not overwriting")
    shutil.copy(src, target)
    base = src.parent.parent / "_base_"
    if base.is_dir() and not (folder.parent / "_base_").exists():
        shutil.copytree(base, folder.parent / "_base_")  # its relative `_base_` imports work
    print(target)
    return target


__all__ = ["copy_cfg"]
