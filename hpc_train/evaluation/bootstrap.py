"""Paired bootstrap of a metric's difference between two systems (Koehn 2004).

Both systems answered the same records, so each draw takes the same records (with replacement)
for both and the difference is computed on that one sample: what varies between records (easy
and hard questions) cancels, and the interval is much narrower than two separate intervals
would suggest. Corpus metrics (BLEU's summed n-gram counts) are recomputed per draw with
:func:`hpc_train.evaluation.metrics.corpus_values` from a counts matrix (how many times each
record is taken), never by averaging per-record BLEU.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpc_train.evaluation import CONFIDENCE, RESAMPLES
from hpc_train.evaluation.metrics import corpus_values

TIE = 5e-4
"""Differences below the table's precision (3 decimals) are no difference: BLEU's smoothing makes
a set without one matching 4-gram score about 1e-5, not 0, and two such systems must not read as
one beating the other."""
CHUNK_CELLS = 1 << 22
"""Most cells (draws x records) of one counts matrix: about 32 MiB of float64 whatever the
number of draws, so memory stays O(chunk x records)."""


@dataclass(frozen=True)
class Difference:
    """``metric(other) - metric(baseline)`` on every paired record, and its percentile interval."""

    value: float
    low: float
    high: float
    draws: int

    @property
    def within_noise(self) -> bool:
        """The interval contains 0: the data cannot tell the two systems apart on this metric."""
        return bool(self.low <= TIE and self.high >= -TIE)

    @property
    def verdict(self) -> str:
        """``better``, ``worse`` (every metric here is higher-is-better) or ``within noise``."""
        if self.within_noise or not np.isfinite([self.low, self.high]).all():
            return "within noise"
        return "better" if self.low > TIE else "worse"

    def to_dict(self) -> dict[str, Any]:
        return {"difference": self.value, "low": self.low, "high": self.high, "draws": self.draws,
                "verdict": self.verdict}


def draw_counts(records: int, draws: int, rng: np.random.Generator,
                chunk_cells: int = CHUNK_CELLS) -> Iterator[np.ndarray]:
    """Chunks of a (draws x records) matrix: how many times each draw takes each record.

    One bincount over the chunk's indices, each draw's offset by ``row * records``, counts every
    row at once; only a chunk is ever held, so a large evaluation does not need draws x records
    memory.
    """
    if records < 1:
        raise ValueError("a bootstrap needs at least one record")
    per_chunk = max(1, min(draws, chunk_cells // records))
    left = draws
    while left > 0:
        rows = min(per_chunk, left)
        picks = rng.integers(0, records, size=(rows, records))
        offsets = np.arange(rows)[:, None] * records
        yield np.bincount((picks + offsets).ravel(), minlength=rows * records).reshape(rows, records)
        left -= rows


def paired_bootstrap(baseline: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]],
                     names: Sequence[str], *, resamples: int = RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> dict[str, Difference]:
    """Each metric's difference ``other - baseline`` with a percentile ``confidence`` interval.

    ``baseline[i]`` and ``other[i]`` must be the same record (pair them by id first). Every
    metric is computed on the same draws, so the intervals of one comparison agree with each
    other, and a fixed ``seed`` makes a report reproducible.
    """
    if len(baseline) != len(other):
        raise ValueError(f"paired rows differ in number: {len(baseline)} and {len(other)}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, not {resamples}")
    everything = np.ones((1, len(baseline)))
    values = {n: _difference(n, baseline, other, everything)[0] for n in names}
    spread: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for counts in draw_counts(len(baseline), resamples, np.random.default_rng(seed)):
        for name in names:
            spread[name].append(_difference(name, baseline, other, counts))
    tail = 100 * (1 - confidence) / 2
    result = {}
    for name in names:
        low, high = np.percentile(np.concatenate(spread[name]), [tail, 100 - tail])
        result[name] = Difference(float(values[name]), float(low), float(high), resamples)
    return result


def _difference(name: str, baseline: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]],
                counts: np.ndarray) -> np.ndarray:
    return corpus_values(name, other, counts) - corpus_values(name, baseline, counts)


__all__ = ["CONFIDENCE", "RESAMPLES", "Difference", "draw_counts", "paired_bootstrap"]
