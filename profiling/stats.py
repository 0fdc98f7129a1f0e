"""Summary statistics of a series of measurements (step times, token counts, ...)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

STAT_KEYS = ("count", "mean", "median", "p95", "min", "max", "std")


def summarize(values: Iterable[float]) -> dict[str, float]:
    """count, mean, median, p95, min, max and (population) std of ``values``.

    p95 is linear-interpolated, as numpy's default. An empty series is an error: a report
    must never show a statistic of nothing as if it were zero.
    """
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        raise ValueError("no values to summarize")
    if not np.isfinite(a).all():
        raise ValueError(f"non-finite values among {a.size} measurements")
    return {
        "count": int(a.size),
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "min": float(a.min()),
        "max": float(a.max()),
        "std": float(a.std()),
    }
