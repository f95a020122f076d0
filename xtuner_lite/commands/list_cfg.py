"""``xtuner list-cfg``: the bundled configs, usable by name."""

from __future__ import annotations

from typing import Annotated

from xtuner_lite.config import CONFIG_ROOT
from xtuner_lite.values import Flag


def list_cfg(pattern: Annotated[str | None, Flag(flags=("-p", "--pattern"))] = None) -> None:
    """List the bundled configs (usable by name).

    Args:
        pattern: only names containing this
    """
    for path in sorted(CONFIG_ROOT.rglob("*.py")):
        if "_base_" not in path.parts and (not pattern or pattern in path.stem):
            print(f"{path.stem:40s} {path.relative_to(CONFIG_ROOT)}")


__all__ = ["list_cfg"]
