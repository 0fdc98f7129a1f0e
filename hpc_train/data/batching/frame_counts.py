"""Videos that cannot share a batch: LLaVA-OneVision stacks the videos of a micro-batch (or of a
packed row) into one tensor, so they must all have the same number of frames.

``check-data`` and the packing plan collect every record's frame counts before training, so a
dataset that would fail at some step is refused up front with advice that applies to the
run's settings (not the collator's generic one at step N).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from hpc_train.errors import DataError


class FrameCounts:
    """Which records hold videos of how many (sampled) frames."""

    def __init__(self) -> None:
        self.by_count: dict[int, list[int]] = {}

    def add(self, position: int, frames: Iterable[int]) -> None:
        """Record the sampled frame count of each video of the record at ``position``."""
        for n in frames:
            self.by_count.setdefault(int(n), []).append(position)

    def mixing_error(self, describe: Callable[[int], str], *, path: str | Path | None, packing: bool,
                     batch_size: int) -> DataError | None:
        """The error to raise when videos of different lengths could meet in one batch, else None;
        ``describe`` names a record position (file:line [id]) in the message."""
        if len(self.by_count) < 2 or not (packing or batch_size > 1):
            return None
        counts = sorted(self.by_count)
        shown = "; ".join(f"{n} frames: {len(self.by_count[n])} video(s), e.g. {describe(self.by_count[n][0])}"
                          for n in counts[:4])
        container = "a packed row" if packing else f"a batch of {batch_size}"
        return DataError(
            f"videos sample to different frame counts ({shown}); LLaVA-OneVision stacks the videos of "
            f"{container}, so these cannot share one",
            path=path,
            fix=f"make every video give the same count: data.video.sampling=uniform data.video.num_frames="
                f"{counts[0]} (the shortest here); or train them one per batch: data.packing=false "
                "train.micro_batch_size=1 (eval.batch_size=1 for the eval set)")


__all__ = ["FrameCounts"]
