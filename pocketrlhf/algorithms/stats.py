"""Uncertainty of the numbers a user reads: binomial intervals and a plain correlation."""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``: unlike the normal interval it stays
    inside [0, 1] and is honest for small n and for proportions near 0 or 1."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_report(accuracy: float, n: int, prefix: str) -> dict:
    """Summary fields of an accuracy with what a reader needs to trust it: n and the 95% interval."""
    return {f"{prefix}_accuracy": accuracy, f"{prefix}_accuracy_n": n,
            f"{prefix}_accuracy_ci95": list(wilson_interval(accuracy * n, n))}


def describe_accuracy(accuracy: float | None, n: int | None) -> str:
    """``0.912 (95% interval 0.85-0.95, n=120)``, the way every accuracy is shown to a user."""
    if accuracy is None or not n:
        return "n/a (no held-out pairs)"
    low, high = wilson_interval(accuracy * n, n)
    return f"{accuracy:.3f} (95% interval {low:.2f}-{high:.2f}, n={n})"


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation, or None when either side is constant or there are < 2 points."""
    n = len(x)
    if n < 2 or len(y) != n:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)
