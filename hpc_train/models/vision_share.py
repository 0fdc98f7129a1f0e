"""The vision work of a sequence-parallel group, shared instead of repeated.

Every rank of the group holds the whole micro-batch; each encodes only its share of the
tiles (SmolVLM: images and video frames alike) or video frames (LLaVA-OneVision), in order,
and the features are all-gathered, so every rank can place them at their tokens before the
sequence is cut. PyTorch's differentiable all-gather returns, in the backward, the sum over
the group of each share's gradient to the rank that encoded it, so a trained tower's
gradients are exact. A rank with no share (fewer items than ranks) encodes the first one and
adds it times zero, so every rank runs the same modules (ZeRO-3 gathers them collectively).
LLaVA-OneVision's images (a few anyres grids per sample) are encoded whole on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_single, wait_tensor

from hpc_train.models.image_tokens import smolvlm_tile_tokens


def share_bounds(count: int, rank: int, size: int) -> tuple[int, int]:
    """Items ``[start, end)`` of ``count`` that rank ``rank`` of ``size`` encodes (contiguous,
    sizes differing by at most one)."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather_shares(local: torch.Tensor, rows: list[int], group: Any) -> torch.Tensor:
    """The group's shares (rank r has ``rows[r]`` rows) concatenated in rank order, on every rank."""
    width = max(rows)
    padded = torch.nn.functional.pad(local, (0, 0, 0, width - local.shape[0]))
    # PyTorch's functional all-gather: its backward reduce-scatters the gradient back to the shares.
    parts = wait_tensor(all_gather_single(padded, 0, group)).view(len(rows), width, *local.shape[1:])
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])


def share_vision(inner: torch.nn.Module, family_name: str, config: Any, group: Any) -> None:
    """Make ``inner`` (the family's model holding tower and language model) encode only this
    rank's share of its media while training."""
    if family_name == "smolvlm":
        inner.get_image_features = _idefics3_tiles(inner, inner.get_image_features, smolvlm_tile_tokens(config), group)
    else:
        inner.get_video_features = _llava_onevision_frames(inner, inner.get_video_features, group)


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
        features = _gathered(local, end > start, [(e - s) * per_tile for s, e in bounds], group)
        out.pooler_output = [features]
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
        features = _gathered(pooled[:-1], end > start, [(e - s) * per_frame for s, e in bounds], group)
        newline = pooled[-1:][None].expand(videos, 1, -1)
        out.pooler_output = torch.cat([features.view(videos, frames * per_frame, -1), newline], dim=1)
        return out

    return get_video_features


def _gathered(local: torch.Tensor, has_share: bool, rows: list[int], group: Any) -> torch.Tensor:
    """The group's features; a rank without a share sends none and keeps its stand-in's graph at zero."""
    if has_share:
        return gather_shares(local, rows, group)
    return gather_shares(local[:0], rows, group) + local.sum() * 0


__all__ = ["gather_shares", "share_bounds", "share_vision"]
