"""Word n-grams of rows and texts, shared by ``xtuner contamination`` and the data-preparation
decontamination stage (kept free of model imports: data workers load it)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

WORD = re.compile(r"\w+", re.UNICODE)


def strings_in(value: Any) -> list[str]:
    """Every string inside a row (any nesting: alpaca fields, message lists, ...)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Lower-cased word n-grams (punctuation dropped)."""
    words = WORD.findall(text.lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def stable_hash(gram: tuple[str, ...]) -> int:
    """A 64-bit hash equal in every process (Python's ``hash`` of str is salted per process)."""
    digest = hashlib.blake2b(" ".join(gram).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
