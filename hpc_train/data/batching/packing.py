"""Sequence packing: which samples share a row, and the packed row itself.

Plan: best-fit decreasing over the samples' token lengths into rows of ``max_seq_len``
(deterministic for a seed and epoch: ties are broken by a seeded shuffle, and the rows'
order is shuffled per epoch), rows dealt round-robin to ranks in equal numbers, so the
number of optimizer steps is known before training starts.

Row: the samples' tokens one after another, ``position_ids`` restarting at 0 for each
sample, ``cu_seqlens`` marking the boundaries for a varlen attention, and the label of each
sample's first token set to -100 so no sample is ever trained to predict the next sample's
first token from its own last one. The samples' media are concatenated in the same order,
so each sample's media tokens meet its own features.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hpc_train.data.batching.collate import has_media_kind
from hpc_train.data.caches.vision_cache import (
    NOT_STORED,
    VISION_FEATURES,
    FeatureCollation,
    token_owners,
)
from hpc_train.data.encoding.loss_positions import loss_positions, num_supervised
from hpc_train.data.encoding.tokenize import IGNORE_INDEX, EncodedSample
from hpc_train.errors import DataError
from hpc_train.models.families import get_family


@dataclass(frozen=True)
class PackPlan:
    """Rows of sample indices for one epoch, and how full they are."""

    rows: list[list[int]]
    real_tokens: int
    slots: int

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots (1.0: no padding at all)."""
        return self.real_tokens / self.slots if self.slots else 0.0


def plan_packs(lengths: Sequence[int], max_seq_len: int, *, seed: int, epoch: int) -> PackPlan:
    """Best-fit decreasing: each sample, longest first, goes to the fullest row it still fits."""
    lengths = [int(n) for n in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > max_seq_len]
    if too_long:
        i = too_long[0]
        raise DataError(f"sample {i} is {lengths[i]} tokens, longer than data.max_seq_len={max_seq_len} "
                        f"({len(too_long)} such samples)",
                        fix="raise data.max_seq_len, use fewer frames, or set data.truncation=drop")
    rng = np.random.default_rng([seed, epoch, 1])
    order = rng.permutation(len(lengths))  # seeded tie-break among equal lengths
    order = sorted(order.tolist(), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    # Free space of each open row, kept sorted with the row's id for best-fit lookups.
    free: list[tuple[int, int]] = []
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - need, row))
        else:
            rows.append([i])
            bisect.insort(free, (max_seq_len - need, len(rows) - 1))
    shuffled = rng.permutation(len(rows))
    rows = [rows[k] for k in shuffled]
    real = sum(lengths)
    return PackPlan(rows=rows, real_tokens=real, slots=len(rows) * max_seq_len)


def drop_too_long(lengths: Sequence[int], max_seq_len: int) -> tuple[list[int], int]:
    """Lengths with samples over ``max_seq_len`` marked unusable (-1), and how many there were
    (``data.truncation: drop``; with ``error`` the plan refuses them instead)."""
    out = [n if n <= max_seq_len else -1 for n in lengths]
    return out, sum(1 for n in lengths if n > max_seq_len)


def rank_rows(plan: PackPlan, *, rank: int, world_size: int, rows_per_step: int) -> list[list[int]]:
    """This rank's rows: round-robin, cut so every rank has the same whole number of steps."""
    usable = (len(plan.rows) // (world_size * rows_per_step)) * world_size * rows_per_step
    return plan.rows[rank:usable:world_size]


def pack_samples(samples: Sequence[EncodedSample], *, pad_token_id: int, family_name: str,
                 pad_to: int | None = None) -> dict[str, torch.Tensor | list[str] | tuple[int, ...]]:
    """One packed row (batch of 1) from several encoded samples."""
    if not samples:
        raise ValueError("nothing to pack")
    ids, labels, positions, starts = [], [], [], [0]
    for s in samples:
        n = len(s)
        ids.append(s.input_ids)
        lab = s.labels.clone()
        lab[0] = IGNORE_INDEX
        labels.append(lab)
        positions.append(torch.arange(n))
        starts.append(starts[-1] + n)
    input_ids = torch.cat(ids)
    label_row = torch.cat(labels)
    position_ids = torch.cat(positions)
    total = int(input_ids.numel())
    if pad_to is not None and pad_to > total:
        # The padding is its own "sample" so no real token attends to it.
        extra = pad_to - total
        input_ids = torch.cat([input_ids, torch.full((extra,), pad_token_id)])
        label_row = torch.cat([label_row, torch.full((extra,), IGNORE_INDEX)])
        position_ids = torch.cat([position_ids, torch.arange(extra)])
        starts.append(pad_to)
    cu = torch.tensor(starts, dtype=torch.int32)
    batch: dict[str, torch.Tensor | list[str] | tuple[int, ...]] = {
        "input_ids": input_ids[None],
        "labels": label_row[None],
        "position_ids": position_ids[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": int((cu[1:] - cu[:-1]).max()),
        "max_length_k": int((cu[1:] - cu[:-1]).max()),
        "sample_bounds": tuple(starts),
        "sample_ids": [s.id for s in samples],
    }
    batch.update(get_family(family_name).layout.packed_row(samples))
    return batch


class PlannedPacks:
    """A batch sampler over this rank's packed micro-batches (``rows_per_micro`` rows each),
    yielding the sample indices of each micro-batch; ``position`` = (epoch, micro-batch)."""

    def __init__(self, lengths: Sequence[int], max_seq_len: int, *, seed: int, rank: int, world_size: int,
                 rows_per_micro: int, grad_accum: int) -> None:
        self.usable = [i for i, n in enumerate(lengths) if n >= 0]
        self.lengths = [lengths[i] for i in self.usable]
        self.max_seq_len = max_seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rows_per_micro, self.grad_accum = rows_per_micro, grad_accum
        self.position = (0, 0)

    def plan(self, epoch: int) -> PackPlan:
        return plan_packs(self.lengths, self.max_seq_len, seed=self.seed, epoch=epoch)

    def micro_batches(self, epoch: int) -> list[list[int]]:
        rows = rank_rows(self.plan(epoch), rank=self.rank, world_size=self.world_size,
                         rows_per_step=self.rows_per_micro * self.grad_accum)
        groups = [rows[k:k + self.rows_per_micro] for k in range(0, len(rows), self.rows_per_micro)]
        return [[self.usable[i] for row in group for i in row] for group in groups]

    def steps_per_epoch(self) -> int:
        rows = len(self.plan(0).rows)  # best-fit decreasing makes the same number every epoch
        return rows // (self.world_size * self.rows_per_micro * self.grad_accum)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.position
        yield from self.micro_batches(epoch)[start:]

    def __len__(self) -> int:
        return self.steps_per_epoch() * self.grad_accum - self.position[1]


class PackedCollator:
    """Packs a micro-batch's samples into one row of ``pad_to`` slots (dropping, and counting,
    skipped ones); a row lacking a media kind gets a blank of it as a last, unsupervised sample."""

    def __init__(self, family_name: str, pad_token_id: int, *, pad_to: int,
                 blanks: Sequence[EncodedSample] = (), features: FeatureCollation | None = None) -> None:
        self.family_name = family_name
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to
        self.blanks = list(blanks)
        self.features = features

    def __call__(self, items: Sequence[object]) -> dict[str, object]:
        samples = [s for s in items if isinstance(s, EncodedSample)]
        skipped = [s for s in items if not isinstance(s, EncodedSample)]
        batch: dict[str, object] = {"sample_ids": [s.id for s in samples], "skipped": skipped,
                                    "num_skipped": len(skipped)}
        if not samples:
            return batch
        real = sum(len(s) for s in samples)
        for blank in self.blanks:
            if not any(has_media_kind(s, blank) or (self.features and self.features.has_kind(s, blank))
                       for s in samples):
                samples.append(blank)
        batch.update(pack_samples(samples, pad_token_id=self.pad_token_id, family_name=self.family_name,
                                  pad_to=self.pad_to))
        if self.features is not None:
            keys: list[str] = []
            owners = torch.cat([token_owners(s, keys) for s in samples])
            owners = F.pad(owners, (0, batch["input_ids"].shape[1] - len(owners)), value=NOT_STORED)
            batch[VISION_FEATURES] = self.features.rows(batch["input_ids"], owners, samples, keys)
        batch["sample_ids"] = [s.id for s in samples if not s.id.startswith("<blank")]
        batch["num_real_tokens"] = real
        batch["num_slots"] = max(self.pad_to, int(batch["input_ids"].shape[1]))
        batch["num_supervised"] = num_supervised(batch["labels"])
        batch["videos_unprepared"] = sum(s.videos_unprepared for s in samples)
        batch.update(loss_positions(batch["labels"]))
        return batch
