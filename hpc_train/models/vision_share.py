"""The vision work of a sequence-parallel group, shared instead of repeated.

Every rank of the group holds the whole micro-batch's media but only a slice of its tokens.
Each rank encodes a contiguous share of the tiles (SmolVLM: images and video frames alike) or
video frames (LLaVA-OneVision), in order; one all-to-all then sends every feature row to the
rank whose slice holds its placeholder token, so no rank holds the features of the whole
sample. The all-to-all is PyTorch's differentiable one: its backward sends each row's
gradient back to the rank that encoded it, so a trained tower's gradients are exact.

Which rows each rank's slice holds (:class:`FeatureRows`) is worked out on the host from the
token ids (:mod:`hpc_train.data.sequence_shard`) and set around the forward with
:func:`features_for`. A rank with no share (fewer items than ranks) encodes the first one and
adds it times zero, so every rank runs the same modules (ZeRO-3 gathers them collectively).
LLaVA-OneVision's images (a few anyres grids per sample) are encoded whole on every rank, each
keeping its slice's rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from hpc_train.models.image_tokens import smolvlm_tile_tokens


@dataclass(frozen=True)
class FeatureRows:
    """For one kind of media (``image`` / ``video``): ``wanted[s]``, the rows of the model's
    features, in their order, whose placeholder tokens are in rank ``s``'s slice (sorted)."""

    wanted: tuple[torch.Tensor, ...]


_ROWS: ContextVar[dict[str, FeatureRows] | None] = ContextVar("sequence_parallel_feature_rows", default=None)


@contextlib.contextmanager
def features_for(rows: dict[str, FeatureRows]) -> Iterator[None]:
    """One training forward whose slice holds ``rows`` of each kind of media features."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def share_bounds(count: int, rank: int, size: int) -> tuple[int, int]:
    """Items ``[start, end)`` of ``count`` that rank ``rank`` of ``size`` encodes (contiguous,
    sizes differing by at most one)."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def route(local: torch.Tensor, spans: list[tuple[int, int]], wanted: tuple[torch.Tensor, ...], group: Any
          ) -> torch.Tensor:
    """This rank's wanted rows, in order, from the group's encoded rows: rank q encoded the
    global rows ``spans[q]`` = [first, end) (``local`` here), ``wanted[s]`` are rank s's."""
    rank = dist.get_rank(group)
    first, end = spans[rank]
    sends = [w[(w >= first) & (w < end)] - first for w in wanted]
    mine = wanted[rank]
    receives = [int(((mine >= lo) & (mine < hi)).sum()) for lo, hi in spans]
    rows = torch.cat(sends).to(local.device)
    out = all_to_all_single_autograd(local[rows], receives, [len(s) for s in sends], group)
    return wait_tensor(out)


def share_vision(inner: torch.nn.Module, family_name: str, config: Any, group: Any) -> None:
    """Make ``inner`` (the family's model holding tower and language model) encode only this
    rank's share of its media while training, and keep only its slice's features."""
    if family_name == "smolvlm":
        inner.get_image_features = _idefics3_tiles(inner, inner.get_image_features, smolvlm_tile_tokens(config), group)
    else:
        inner.get_video_features = _llava_onevision_frames(inner, inner.get_video_features, group)
        inner.get_image_features = _llava_onevision_images(inner, inner.get_image_features, group)


def _rows(kind: str) -> FeatureRows:
    rows = _ROWS.get()
    if rows is None or kind not in rows:
        raise ValueError("a training forward under sequence parallelism takes micro-batches cut by "
                         "data.sequence_shard (their feature rows set with features_for)")
    return rows[kind]


def _idefics3_tiles(inner: torch.nn.Module, original: Callable[..., Any], per_tile: int, group: Any
                    ) -> Callable[..., Any]:
    rank, size = dist.get_rank(group), dist.get_world_size(group)

    def get_image_features(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                           **kwargs: Any) -> Any:
        if not inner.training:
            return original(pixel_values, pixel_attention_mask, **kwargs)
        tiles = pixel_values.flatten(0, 1)
        real = (tiles != 0).flatten(1).any(1).nonzero().squeeze(1)  # Idefics3's rule: all-zero tiles are padding
        bounds = [share_bounds(len(real), r, size) for r in range(size)]
        start, end = bounds[rank]
        pick = real[start:end] if end > start else real[:1]
        mask = None if pixel_attention_mask is None else pixel_attention_mask.flatten(0, 1)[pick][None]
        out = original(tiles[pick][None], mask, **kwargs)
        local = torch.cat(list(out.pooler_output))
        spans = [(s * per_tile, e * per_tile) for s, e in bounds]
        out.pooler_output = [_routed(local, end > start, spans, _rows("image"), group)]
        return out

    return get_image_features


def _llava_onevision_frames(inner: torch.nn.Module, original: Callable[..., Any], group: Any) -> Callable[..., Any]:
    rank, size = dist.get_rank(group), dist.get_world_size(group)

    def get_video_features(pixel_values_videos: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not inner.training:
            return original(pixel_values_videos, *args, **kwargs)
        videos, frames = pixel_values_videos.shape[:2]
        flat = pixel_values_videos.flatten(0, 1)
        bounds = [share_bounds(videos * frames, r, size) for r in range(size)]
        start, end = bounds[rank]
        out = original(flat[start:end][None] if end > start else flat[:1][None], *args, **kwargs)
        pooled = out.pooler_output[0]  # this share's frames, then the video's newline
        per_frame = (pooled.shape[0] - 1) // max(end - start, 1)
        local = _with_newlines(pooled, start, max(end, start + 1), frames, per_frame)
        spans = [_video_rows(s, e, frames, per_frame) for s, e in bounds]
        out.pooler_output = _routed(local, end > start, spans, _rows("video"), group)[None]
        return out

    return get_video_features


def _llava_onevision_images(inner: torch.nn.Module, original: Callable[..., Any], group: Any) -> Callable[..., Any]:
    rank = dist.get_rank(group)

    def get_image_features(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if inner.training:
            wanted = _rows("image").wanted[rank]
            out.pooler_output = [torch.cat(list(out.pooler_output))[wanted.to(out.pooler_output[0].device)]]
        return out

    return get_image_features


def _video_rows(start: int, end: int, frames: int, per_frame: int) -> tuple[int, int]:
    """Global feature rows of flattened frames [start, end): each video is its frames' rows then
    one newline row."""
    def row(i: int) -> int:
        return (i // frames) * (frames * per_frame + 1) + (i % frames) * per_frame

    if end <= start:
        return row(start), row(start)
    return row(start), row(end - 1) + per_frame + int((end - 1) % frames == frames - 1)


def _with_newlines(pooled: torch.Tensor, start: int, end: int, frames: int, per_frame: int) -> torch.Tensor:
    """The share's rows in the global layout: a newline after each video's last frame."""
    feats, newline = pooled[:-1].view(end - start, per_frame, -1), pooled[-1:]
    pieces, first = [], start
    while first < end:
        stop = min(end, (first // frames + 1) * frames)
        pieces.append(feats[first - start:stop - start].flatten(0, 1))
        if stop % frames == 0:
            pieces.append(newline)
        first = stop
    return torch.cat(pieces)


def _routed(local: torch.Tensor, has_share: bool, spans: list[tuple[int, int]], rows: FeatureRows,
            group: Any) -> torch.Tensor:
    """The routed rows; a rank without a share sends none and keeps its stand-in's graph at zero."""
    if has_share:
        return route(local, spans, rows.wanted, group)
    return route(local[:0], spans, rows.wanted, group) + local.sum() * 0


__all__ = ["FeatureRows", "features_for", "route", "share_bounds", "share_vision"]
