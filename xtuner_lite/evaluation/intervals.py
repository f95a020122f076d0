"""95 % intervals for before/after comparisons on held-out sets."""

from __future__ import annotations

import math

Z95 = 1.96


def wilson(hits: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound at 0 or n hits, unlike the normal one)."""
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    centre = (p + Z95 * Z95 / (2 * n)) / (1 + Z95 * Z95 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 * Z95 / (4 * n * n)) / (1 + Z95 * Z95 / n)
    return centre - half, centre + half


def paired_difference(before: list[float], after: list[float]) -> tuple[float, float, float]:
    """Mean of after - before over paired items and its 95 % normal interval."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = Z95 * math.sqrt(var / n)
    return mean, mean - half, mean + half


__all__ = ["paired_difference", "wilson"]
