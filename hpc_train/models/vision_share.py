"""The vision work of a sequence-parallel group, shared instead of repeated.

Every rank of the group holds only a slice of a micro-batch's tokens and only the pixels it
encodes (:mod:`hpc_train.data.media_share` decides both on the host: a video frame is decoded
and encoded by one rank, SmolVLM's image tiles are split evenly). One all-to-all then sends
every feature row to the rank whose slice holds its placeholder token, so no rank holds the
features of the whole sample. The all-to-all is PyTorch's differentiable one: its backward
sends each row's gradient back to the rank that encoded it, so a trained tower's gradients
are exact.

The rows each rank encodes and needs (:class:`FeatureRows`) are set around the forward with
:func:`features_for`. A rank with no share encodes a stand-in and adds it times zero, so every
rank runs the same modules (ZeRO-3 gathers them collectively). LLaVA-OneVision's images (a few
anyres grids per sample) are encoded whole on every rank, each keeping its slice's rows.
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


@dataclass(frozen=True)
class FeatureRows:
    """For one kind of media (``image`` / ``video``), over the rows of the model's features."""

    wanted: tuple[torch.Tensor, ...]
    """``wanted[s]``: the rows whose placeholder tokens are in rank ``s``'s slice (sorted)."""
    encoded: tuple[torch.Tensor, ...] = ()
    """``encoded[s]``: the rows rank ``s`` encodes, sorted (the order its tower makes them);
    empty when every rank encodes the whole kind (LLaVA-OneVision's images)."""
    newline_after: tuple[int, ...] = ()
    """LLaVA-OneVision videos: this rank's local frames that end a video (a newline row follows)."""


_ROWS: ContextVar[dict[str, FeatureRows] | None] = ContextVar("sequence_parallel_feature_rows", default=None)


@contextlib.contextmanager
def features_for(rows: dict[str, FeatureRows]) -> Iterator[None]:
    """One training forward whose ranks encode and need ``rows`` of each kind of media features."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def route(local: torch.Tensor, encoded: tuple[torch.Tensor, ...], wanted: tuple[torch.Tensor, ...], group: Any
          ) -> torch.Tensor:
    """This rank's wanted rows, in order, from the group's encoded rows: rank q encoded the
    global rows ``encoded[q]`` (sorted; ``local`` here), rank s wants ``wanted[s]``."""
    rank = dist.get_rank(group)
    own = encoded[rank]
    sends = [torch.searchsorted(own, w[torch.isin(w, own)]) for w in wanted]
    mine = wanted[rank]
    source = torch.zeros(len(mine), dtype=torch.long)
    for q, rows in enumerate(encoded):
        source[torch.isin(mine, rows)] = q
    receives = torch.bincount(source, minlength=len(encoded)).tolist()
    # Rows arrive grouped by sender (each group sorted); ``back`` puts them in ``mine``'s order.
    back = torch.argsort(torch.argsort(source, stable=True))
    out = all_to_all_single_autograd(local[torch.cat(sends).to(local.device)], receives,
                                     [len(s) for s in sends], group)
    return wait_tensor(out)[back.to(local.device)]


def share_vision(inner: torch.nn.Module, family_name: str, group: Any) -> None:
    """Make ``inner`` (the family's model holding tower and language model) encode only this
    rank's pixels while training, and keep only its slice's features."""
    if family_name == "smolvlm":
        inner.get_image_features = _idefics3_tiles(inner, inner.get_image_features, group)
    else:
        inner.get_video_features = _llava_onevision_frames(inner, inner.get_video_features, group)
        inner.get_image_features = _llava_onevision_images(inner, inner.get_image_features, group)


def _rows(kind: str) -> FeatureRows:
    rows = _ROWS.get()
    if rows is None or kind not in rows:
        raise ValueError("a training forward under sequence parallelism takes micro-batches cut by "
                         "data.sequence_shard (their feature rows set with features_for)")
    return rows[kind]


def _idefics3_tiles(inner: torch.nn.Module, original: Callable[..., Any], group: Any) -> Callable[..., Any]:
    def get_image_features(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                           **kwargs: Any) -> Any:
        if not inner.training:
            return original(pixel_values, pixel_attention_mask, **kwargs)
        out = original(pixel_values, pixel_attention_mask, **kwargs)  # this rank's tiles only
        out.pooler_output = [_routed(torch.cat(list(out.pooler_output)), _rows("image"), group)]
        return out

    return get_image_features


def _llava_onevision_frames(inner: torch.nn.Module, original: Callable[..., Any], group: Any) -> Callable[..., Any]:
    def get_video_features(pixel_values_videos: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not inner.training:
            return original(pixel_values_videos, *args, **kwargs)
        rows = _rows("video")
        out = original(pixel_values_videos, *args, **kwargs)  # this rank's frames as one video
        pooled = out.pooler_output[0]  # the frames' rows, then one newline row
        frames = pixel_values_videos.shape[1]
        per_frame = (pooled.shape[0] - 1) // frames
        order = _with_newlines(frames, per_frame, rows.newline_after)
        out.pooler_output = _routed(pooled[order.to(pooled.device)], rows, group)[None]
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


def _with_newlines(frames: int, per_frame: int, newline_after: tuple[int, ...]) -> torch.Tensor:
    """Row order of the local frames' features in the global layout: a newline row (the last
    one the tower made) after each frame that ends a video."""
    rows = torch.arange(frames * per_frame).view(frames, per_frame)
    newline = torch.tensor([frames * per_frame])
    return torch.cat([torch.cat([rows[j], newline]) if j in newline_after else rows[j] for j in range(frames)])


def _routed(local: torch.Tensor, rows: FeatureRows, group: Any) -> torch.Tensor:
    """The routed rows; a rank without a share sends none and keeps its stand-in's graph at zero."""
    if len(rows.encoded[dist.get_rank(group)]):
        return route(local, rows.encoded, rows.wanted, group)
    return route(local[:0], rows.encoded, rows.wanted, group) + local.sum() * 0


__all__ = ["FeatureRows", "features_for", "route", "share_vision"]
