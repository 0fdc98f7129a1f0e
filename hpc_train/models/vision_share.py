"""The vision work of a sequence-parallel group, shared instead of repeated.

Every rank of the group holds only a slice of a micro-batch's tokens and only the pixels it
encodes (:mod:`hpc_train.data.decoding.media_share` decides both on the host: a video frame is decoded
and encoded by one rank, SmolVLM's image tiles are split evenly). One all-to-all then sends
every feature row to the rank whose slice holds its placeholder token, so no rank holds the
features of the whole sample. The all-to-all is PyTorch's differentiable one: its backward
sends each row's gradient back to the rank that encoded it, so a trained tower's gradients
are exact.

The rows each rank encodes and needs (:class:`FeatureRows`) are set around the forward with
:func:`features_for`; each family wraps its inner model's feature methods with :func:`rows_of`
and :func:`routed` (``Family.share_vision``). A rank with no share encodes a stand-in and adds it times zero, so every
rank runs the same modules (ZeRO-3 gathers them collectively).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor


@dataclass(frozen=True)
class Routing:
    """One rank's all-to-all of feature rows, worked out on the host (:func:`routing`)."""

    send: torch.Tensor
    """Local rows to send, grouped by the rank they go to."""
    send_counts: list[int]
    receive_counts: list[int]
    back: torch.Tensor
    """Puts the received rows (grouped by sender) in the order of this rank's placeholders."""


@dataclass(frozen=True)
class FeatureRows:
    """For one kind of media (``image`` / ``video``), over the rows of the model's features, as
    rank ``rank`` of the group sees them."""

    rank: int
    wanted: tuple[torch.Tensor, ...]
    """``wanted[s]``: the rows whose placeholder tokens are in rank ``s``'s slice (sorted)."""
    encoded: tuple[torch.Tensor, ...] = ()
    """``encoded[s]``: the rows rank ``s`` encodes, sorted (the order they are routed in);
    empty when the group does not share the kind (every rank encodes it whole)."""
    local_order: torch.Tensor | None = None
    """LLaVA-OneVision videos: the tower's rows of this rank's frames (then one newline) in
    ``encoded[rank]``'s order (a newline after each frame that ends a video)."""
    routing: Routing | None = None
    """This rank's all-to-all (when the group shares the kind's encoding)."""


def routing(rank: int, encoded: tuple[torch.Tensor, ...], wanted: tuple[torch.Tensor, ...]) -> Routing:
    """Rank ``rank``'s all-to-all: rank q encoded the global rows ``encoded[q]`` (sorted), rank s
    wants ``wanted[s]`` (sorted). Host tensors in, host tensors out."""
    own = encoded[rank]
    sends = [torch.searchsorted(own, w[torch.isin(w, own)]) for w in wanted]
    mine = wanted[rank]
    source = torch.zeros(len(mine), dtype=torch.long)
    for q, rows in enumerate(encoded):
        source[torch.isin(mine, rows)] = q
    return Routing(send=torch.cat(sends), send_counts=[len(s) for s in sends],
                   receive_counts=torch.bincount(source, minlength=len(encoded)).tolist(),
                   back=torch.argsort(torch.argsort(source, stable=True)))


_ROWS: ContextVar[dict[str, FeatureRows] | None] = ContextVar("sequence_parallel_feature_rows", default=None)


@contextlib.contextmanager
def features_for(rows: dict[str, FeatureRows]) -> Iterator[None]:
    """One training forward whose ranks encode and need ``rows`` of each kind of media features."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def route(local: torch.Tensor, plan: Routing, group: Any) -> torch.Tensor:
    """This rank's wanted rows, in order, from the group's encoded rows (``local`` here)."""
    device = local.device
    out = all_to_all_single_autograd(local[plan.send.to(device)], plan.receive_counts, plan.send_counts, group)
    return wait_tensor(out)[plan.back.to(device)]


def rows_of(kind: str) -> FeatureRows:
    """The feature rows of ``kind`` set for this training forward by :func:`features_for`."""
    rows = _ROWS.get()
    if rows is None or kind not in rows:
        raise ValueError("a training forward under sequence parallelism takes micro-batches cut by "
                         "data.sequence_shard (their feature rows set with features_for)")
    return rows[kind]


def routed(local: torch.Tensor, rows: FeatureRows, group: Any) -> torch.Tensor:
    """The routed rows; a rank without a share sends none and keeps its stand-in's graph at zero."""
    if len(rows.encoded[rows.rank]):
        return route(local, rows.routing, group)
    return route(local[:0], rows.routing, group) + local.sum() * 0


__all__ = ["FeatureRows", "Routing", "features_for", "route", "routed", "routing", "rows_of"]
