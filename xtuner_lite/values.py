"""The value types of command and library signatures: each says what it accepts once, and the CLI
(``xtuner_lite/cli.py``), generated from the signatures, checks a flag's text with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from xtuner_lite.errors import UsageError

GiB = 1024**3
SIZE_UNITS = {"gib": GiB, "gb": 1e9, "mib": 1024**2, "mb": 1e6, "kib": 1024, "kb": 1e3,
              "g": GiB, "m": 1024**2}  # fmt: skip


def parse_size(text: str) -> float:
    """Bytes in a memory size such as ``8GiB``, ``24GB``, ``500MB`` (a bare number is GiB)."""
    lowered = str(text).strip().lower()
    unit = next((u for u in SIZE_UNITS if lowered.endswith(u)), None)
    try:
        number = float(lowered[: -len(unit)] if unit else lowered)
        value = number * (SIZE_UNITS[unit] if unit else GiB)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"cannot read memory size {text!r} (e.g. 8GiB, 24GB, 500MB)")
    return value


def _size_text(text: str) -> str:
    parse_size(text)
    return text


def cache_bytes(text: str) -> int:
    """Bytes of a memory budget that may be off: ``0`` is 0, else :func:`parse_size`."""
    return 0 if str(text).strip() == "0" else int(parse_size(text))


def _cache_size_text(text: str) -> str:
    cache_bytes(text)
    return text


@dataclass(frozen=True)
class Check:
    """What a value must be: ``convert`` the text, then ``ok``; else the CLI names ``accepted``."""

    accepted: str
    ok: Callable[[Any], bool] = lambda value: True
    convert: Callable[[str], Any] = int


@dataclass(frozen=True)
class Flag:
    """How a parameter is spelled on the command line when not ``--its-name`` (a required one:
    an argument): other flags (``--pre``, ``-p``), a metavar, ``option=True`` for a required value
    given as a flag, ``positional=True`` for an optional argument."""

    flags: tuple[str, ...] = ()
    metavar: str | None = None
    option: bool = False
    positional: bool = False


PositiveInt = Annotated[int, Check("an integer >= 1", lambda v: v >= 1)]
NonNegativeInt = Annotated[int, Check("an integer >= 0", lambda v: v >= 0)]
Port = Annotated[int, Check("a port in [0, 65535] (0: any free port)", lambda v: 0 <= v <= 65535)]
Fraction = Annotated[float, Check("a number in [0, 1]", lambda v: 0 <= v <= 1, float)]
Size = Annotated[str, Check("a size such as 2GB or 500MB", convert=_size_text)]
CacheSize = Annotated[str, Check("a size such as 512MiB, or 0 (off)", convert=_cache_size_text)]
CfgOptions = Annotated[list[str] | None, Flag(metavar="KEY=VALUE")]


__all__ = [
    "CacheSize",
    "CfgOptions",
    "Check",
    "Flag",
    "Fraction",
    "GiB",
    "NonNegativeInt",
    "Port",
    "PositiveInt",
    "Size",
    "cache_bytes",
    "parse_size",
]
