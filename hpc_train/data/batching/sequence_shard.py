"""One rank's share of a micro-batch under sequence parallelism, decided on the host.

Every rank of a sequence-parallel group collates the same micro-batch; this wrapper then
pads its rows to a multiple of the group size, gives them global ``position_ids`` (rotary
positions of the whole row), drops the padding mask (the batch is right-padded, so causal
attention is exact for every real token), cuts ``input_ids`` and ``position_ids`` to this
rank's slice of the sequence and replaces the loss's positions by the slice's. The pixels are
cut to those this rank encodes (:mod:`hpc_train.data.decoding.media_share`: the video frames it decoded,
its share of the image tiles), with the feature rows each rank encodes and each rank's slice
holds (the group routes them, :mod:`hpc_train.models.vision_share`). What the loss needs to average exactly over the group — the
micro-batch's supervised count, each packed sample's — travels with it, and the bookkeeping
counts become this rank's share, so summing them over all ranks counts every token once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hpc_train.data.decoding.media_share import split_media
from hpc_train.data.encoding.loss_positions import loss_positions, num_supervised
from hpc_train.data.encoding.tokenize import IGNORE_INDEX
from hpc_train.models.vision_share import FeatureRows

SHARD = "sequence_shard"
"""A :class:`ShardFacts` (host numbers) in a sharded batch."""
SAMPLE_COUNTS = "loss_sample_counts"
"""Packed rows: (samples,) int64 supervised targets of each sample of the whole row (the
``packing_loss: sample`` denominators)."""
SHARD_KEYS = (SHARD, SAMPLE_COUNTS)
"""Keys the loss reads and the model never sees."""


@dataclass(frozen=True)
class ShardFacts:
    """Where this rank's slice of the micro-batch is, and the whole micro-batch's loss count."""

    rank: int
    size: int
    offset: int
    """First position of this rank's slice."""
    length: int
    """Positions in each slice (the padded row length / ``size``)."""
    loss_count: int
    """Supervised targets of the whole micro-batch: the token-mean loss's denominator."""
    feature_rows: dict[str, FeatureRows]
    """Per kind of media in the micro-batch: the feature rows each rank encodes and its slice holds."""
    whole_tokens: int
    whole_samples: int
    """Real tokens and samples of the whole micro-batch (the sequences its attention spans)."""


class SequenceShards:
    """A collator's micro-batches, cut to rank ``rank`` of a sequence-parallel group of ``size``."""

    def __init__(self, collate: Callable[[Sequence[Any]], dict[str, Any]], *, rank: int, size: int,
                 pad_token_id: int, media_tokens: dict[str, int]) -> None:
        """``media_tokens``: the placeholder token id of each kind of media features."""
        if not 0 <= rank < size:
            raise ValueError(f"sequence-parallel rank {rank} is not in a group of {size}")
        self.collate, self.rank, self.size, self.pad_token_id = collate, rank, size, pad_token_id
        self.media_tokens = media_tokens

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        batch = self.collate(items)
        if "input_ids" in batch:
            batch = shard_batch(batch, rank=self.rank, size=self.size, pad_token_id=self.pad_token_id,
                                media_tokens=self.media_tokens)
        if self.rank:  # the group's samples are counted once, by its first rank
            batch = {**batch, "sample_ids": [], "num_skipped": 0}
        return batch


def shard_batch(batch: dict[str, Any], *, rank: int, size: int, pad_token_id: int,
                media_tokens: dict[str, int] | None = None) -> dict[str, Any]:
    """``batch`` (padded or packed, from our collators) as rank ``rank`` of ``size`` trains it."""
    batch = _padded_to_multiple(dict(batch), size, pad_token_id)
    rows, length = batch["input_ids"].shape
    real = _real_positions(batch)
    mask = batch.pop("attention_mask", None)
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("sequence parallelism takes right-padded batches (a left-padded row would need its "
                         "padding mask, which the sequence split drops)")
    if "position_ids" not in batch:
        batch["position_ids"] = torch.arange(length).expand(rows, length).contiguous()
    share = length // size
    start = rank * share
    labels = batch["labels"]
    # A position predicts the next label, so the slice's targets reach one past its end.
    window = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, start:start + share + 1]
    batch.update(loss_positions(window))
    if "cu_seq_lens_q" in batch:
        batch[SAMPLE_COUNTS] = sample_counts(labels[0], batch["cu_seq_lens_q"])
    ids = batch["input_ids"]
    rows_of = split_media(batch, rank, size, {kind: feature_rows(ids, token, size)
                                              for kind, token in (media_tokens or {}).items()})
    batch[SHARD] = ShardFacts(rank=rank, size=size, offset=start, length=share,
                              loss_count=num_supervised(labels), feature_rows=rows_of,
                              whole_tokens=batch["num_real_tokens"], whole_samples=len(batch["sample_ids"]))
    batch["input_ids"] = ids[:, start:start + share].contiguous()
    batch["position_ids"] = batch["position_ids"][:, start:start + share].contiguous()
    batch["num_real_tokens"] = int(real[:, start:start + share].sum())
    batch["num_slots"] = rows * share
    batch["num_supervised"] = num_supervised(window)
    return batch


def feature_rows(input_ids: torch.Tensor, token: int, size: int) -> tuple[torch.Tensor, ...]:
    """Per rank of ``size``: the ordinals (row-major over the batch: the order the model's
    features come in) of the ``token`` placeholders in its slice of the columns."""
    placed = input_ids == token
    ordinal = placed.flatten().cumsum(0).view(placed.shape) - 1
    share = input_ids.shape[1] // size
    return tuple(ordinal[:, r * share:(r + 1) * share][placed[:, r * share:(r + 1) * share]] for r in range(size))


def sample_counts(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Supervised targets of each sample of one packed row (position t predicts label t+1,
    and each sample's first label is -100, so a target never belongs to the sample before)."""
    targets = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1) + 1
    owner = torch.bucketize(targets, cu_seqlens[1:].to(targets), right=True)
    return torch.bincount(owner, minlength=len(cu_seqlens) - 1)


def _real_positions(batch: dict[str, Any]) -> torch.Tensor:
    """(rows, length) 1 where a position holds a real token: the mask of a padded batch, the
    samples at the front of a packed row (blanks and padding follow them)."""
    rows, length = batch["input_ids"].shape
    if "attention_mask" in batch:
        return batch["attention_mask"]
    if "cu_seq_lens_q" in batch:
        return (torch.arange(length) < batch["num_real_tokens"]).long()[None]
    return torch.ones(rows, length, dtype=torch.long)


def _padded_to_multiple(batch: dict[str, Any], size: int, pad_token_id: int) -> dict[str, Any]:
    """The rows padded on the right to a multiple of ``size`` positions; a packed row's
    padding is a sample of its own, so no real token attends to it."""
    length = batch["input_ids"].shape[1]
    extra = -length % size
    if not extra:
        return batch
    batch["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=pad_token_id)
    batch["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
    if "cu_seq_lens_q" not in batch:
        mask = batch.get("attention_mask", torch.ones_like(batch["labels"][:, :length]))
        batch["attention_mask"] = F.pad(mask, (0, extra), value=0)
    else:
        batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra)[None]], dim=1)
        cu = torch.cat([batch["cu_seq_lens_q"], torch.tensor([length + extra], dtype=batch["cu_seq_lens_q"].dtype)])
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["sample_bounds"] = (*batch["sample_bounds"], length + extra)
        batch["max_length_q"] = batch["max_length_k"] = max(batch["max_length_q"], extra)
    return batch


__all__ = ["SAMPLE_COUNTS", "SHARD", "SHARD_KEYS", "SequenceShards", "ShardFacts", "feature_rows", "sample_counts",
           "shard_batch"]
