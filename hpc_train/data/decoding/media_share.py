"""Which rank of a sequence-parallel group decodes and encodes which media, decided on the host.

A video's sampled frames are split into contiguous shares, one per rank (:func:`share_bounds`):
rank ``r`` decodes only its share (the other frames stay black stand-ins that keep the
processor's token counts), and its vision tower encodes exactly the frames it decoded, so no
pixel crosses the group and each frame is decoded and encoded once. Images are cheap to decode:
every rank reads them whole, and the group splits their encoding (SmolVLM: the tiles evenly;
LLaVA-OneVision: whole samples' images; LLaVA-OneVision-1.5: whole images).

:func:`split_media` keeps a rank's own pixels in its micro-batch and says, per kind of media
features, which global feature rows each rank encodes and which its slice of the tokens needs
(:class:`FeatureRows`); :mod:`hpc_train.models.vision_share` routes the rows between them.
"""

from __future__ import annotations

from typing import Any

import torch

from hpc_train.models.media_keys import (
    IMAGE_ROWS,
    IMAGE_TILE,
    MEDIA_GRIDS,
    PADDING_TILE,
    TILE_FRAMES,
)
from hpc_train.models.vision_share import FeatureRows, routing


def share_bounds(count: int, rank: int, size: int) -> tuple[int, int]:
    """Items ``[start, end)`` of ``count`` that rank ``rank`` of ``size`` takes (contiguous,
    sizes differing by at most one)."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def frame_owners(frame: torch.Tensor, frames: torch.Tensor, size: int) -> torch.Tensor:
    """The rank that decodes frame ``frame`` of a video of ``frames`` (elementwise): the inverse
    of :func:`share_bounds`."""
    base, extra = frames // size, frames % size
    split = extra * (base + 1)
    return torch.where(frame < split, frame // (base + 1), extra + (frame - split) // base.clamp(min=1))


def split_media(batch: dict[str, Any], rank: int, size: int, wanted: dict[str, tuple[torch.Tensor, ...]]
                ) -> dict[str, FeatureRows]:
    """Cut ``batch``'s pixels to those rank ``rank`` encodes (in place) and return every kind's
    :class:`FeatureRows`. ``wanted``: per kind, the rows each rank's slice holds."""
    rows = {kind: FeatureRows(rank, w) for kind, w in wanted.items()}  # encoded whole on every rank, unless split here
    if TILE_FRAMES in batch:
        rows["image"] = _split_tiles(batch, rank, size, wanted["image"])
    if IMAGE_ROWS in batch:
        rows["image"] = _split_images(batch, rank, size, wanted["image"])
    if "image_grid_thw" in batch:
        rows["image"] = _split_grid(batch, MEDIA_GRIDS["image"], rank, size, wanted["image"], by_frame=False)
    if "video_grid_thw" in batch:
        rows["video"] = _split_grid(batch, MEDIA_GRIDS["video"], rank, size, wanted["video"], by_frame=True)
    elif "pixel_values_videos" in batch:
        rows["video"] = _split_video_frames(batch, rank, size, wanted["video"])
    return rows


def _split_grid(batch: dict[str, Any], keys: tuple[str, str], rank: int, size: int, wanted: tuple[torch.Tensor, ...],
                *, by_frame: bool) -> FeatureRows:
    """LLaVA-OneVision-1.5: each rank encodes a contiguous share of the images, or of every
    video's frames (the frames its rank decoded); a frame of h·w patch rows makes h·w / 4 feature
    rows. A rank without a share encodes the first frame or image, times zero."""
    pixels_key, grid_key = keys
    grid = batch[grid_key].tolist()
    merge = sum(len(w) for w in wanted)  # feature rows in all: patch rows / merge window
    window = sum(t * h * w for t, h, w in grid) // max(merge, 1)
    pieces = grid_shares(grid, size, by_frame=by_frame)
    patch_start = [0]
    for t, h, w in grid:
        patch_start.append(patch_start[-1] + t * h * w)

    def rows(item: int, first: int, frames: int, hw: int, per: int) -> torch.Tensor:
        begin = patch_start[item] // per + first * hw // per
        return torch.arange(begin, begin + frames * hw // per)

    encoded = tuple(torch.cat([rows(*p, window) for p in mine]) if mine else torch.zeros(0, dtype=torch.long)
                    for mine in pieces)
    mine = pieces[rank] or [(0, 0, 1, grid[0][1] * grid[0][2])]
    batch[pixels_key] = batch[pixels_key][torch.cat([rows(*p, 1) for p in mine])]
    batch[grid_key] = torch.tensor([[frames, grid[item][1], grid[item][2]] for item, _, frames, _ in mine])
    return FeatureRows(rank, wanted, encoded, routing=routing(rank, encoded, wanted))


def grid_shares(grid: list[list[int]], size: int, *, by_frame: bool) -> list[list[tuple[int, int, int, int]]]:
    """Per rank of ``size``, what it encodes of the items of ``grid`` (rows of frames, patch rows,
    patch columns): ``(item, first frame, frames, h·w)``, whole items or each item's frames in
    contiguous shares (``by_frame``)."""
    pieces: list[list[tuple[int, int, int, int]]] = [[] for _ in range(size)]
    for q in range(size):
        if by_frame:
            for item, (t, h, w) in enumerate(grid):
                start, end = share_bounds(t, q, size)
                if end > start:
                    pieces[q].append((item, start, end - start, h * w))
        else:
            start, end = share_bounds(len(grid), q, size)
            pieces[q] = [(item, 0, grid[item][0], grid[item][1] * grid[item][2]) for item in range(start, end)]
    return pieces


def _split_tiles(batch: dict[str, Any], rank: int, size: int, wanted: tuple[torch.Tensor, ...]) -> FeatureRows:
    """SmolVLM: a video frame's tiles go to the rank that decoded it, images' tiles are split evenly."""
    tags = batch.pop(TILE_FRAMES).flatten(0, 1)
    real = (tags[:, 0] != PADDING_TILE).nonzero().squeeze(1)
    frame, frames = tags[real, 0], tags[real, 1]
    owner = frame_owners(frame.clamp(min=0), frames.clamp(min=1), size)
    image = (frame == IMAGE_TILE).nonzero().squeeze(1)
    for q in range(size):
        start, end = share_bounds(len(image), q, size)
        owner[image[start:end]] = q
    per_tile = sum(len(w) for w in wanted) // max(len(real), 1)
    encoded = tuple(_rows_of((owner == q).nonzero().squeeze(1), per_tile) for q in range(size))
    mine = real[owner == rank]
    pick = mine if len(mine) else real[:1]  # a rank without a share encodes a stand-in, times zero
    batch["pixel_values"] = batch["pixel_values"].flatten(0, 1)[pick][None]
    if "pixel_attention_mask" in batch:
        batch["pixel_attention_mask"] = batch["pixel_attention_mask"].flatten(0, 1)[pick][None]
    return FeatureRows(rank, wanted, encoded, routing=routing(rank, encoded, wanted))


def _split_images(batch: dict[str, Any], rank: int, size: int, wanted: tuple[torch.Tensor, ...]) -> FeatureRows:
    """LLaVA-OneVision: each rank encodes the images of a share of the samples (a sample's images
    stay together: whether an image is tiled, anyres, depends on how many its sample has)."""
    counts = batch.pop(IMAGE_ROWS)
    per_sample = [n for n in batch["batch_num_images"].tolist() if n]
    first = [0, *torch.tensor(per_sample).cumsum(0).tolist()]  # each sample's first image
    row = [0, *counts.cumsum(0).tolist()]  # each image's first feature row
    bounds = [share_bounds(len(per_sample), q, size) for q in range(size)]
    encoded = tuple(torch.arange(row[first[a]], row[first[b]]) for a, b in bounds)  # contiguous images
    start, end = bounds[rank]
    if end == start:  # a rank without a share encodes the first sample's images, times zero
        start, end = 0, 1
    mine = slice(first[start], first[end])
    batch["pixel_values"], batch["image_sizes"] = batch["pixel_values"][mine], batch["image_sizes"][mine]
    batch["batch_num_images"] = torch.tensor(per_sample[start:end])
    return FeatureRows(rank, wanted, encoded, routing=routing(rank, encoded, wanted))


def _split_video_frames(batch: dict[str, Any], rank: int, size: int, wanted: tuple[torch.Tensor, ...]
                        ) -> FeatureRows:
    """LLaVA-OneVision: each rank encodes its share of every video's frames; a video's rows are
    its frames' then one newline row, which goes with its last frame."""
    pixels = batch["pixel_values_videos"]
    videos, frames = pixels.shape[:2]
    per_video = sum(len(w) for w in wanted) // videos
    per_frame = (per_video - 1) // frames
    encoded = []
    for q in range(size):
        start, end = share_bounds(frames, q, size)
        one = torch.arange(start * per_frame, end * per_frame)
        if end == frames > start:  # the newline goes with the video's last frame
            one = torch.cat([one, torch.tensor([per_video - 1])])
        encoded.append((torch.arange(videos)[:, None] * per_video + one).flatten())
    start, end = share_bounds(frames, rank, size)
    kept = pixels[:, start:end] if end > start else pixels[:1, :1]
    batch["pixel_values_videos"] = kept.flatten(0, 1)[None]
    ends = {v * (end - start) + end - start - 1 for v in range(videos)} if end == frames > start else set()
    return FeatureRows(rank, wanted, tuple(encoded), _with_newlines(len(kept.flatten(0, 1)), per_frame, ends),
                       routing(rank, tuple(encoded), wanted))


def _with_newlines(frames: int, per_frame: int, ends: set[int]) -> torch.Tensor:
    """The tower's rows of ``frames`` local frames (then one newline row) in the global layout's
    order: the newline after each frame in ``ends``."""
    rows = torch.arange(frames * per_frame).view(frames, per_frame)
    newline = torch.tensor([frames * per_frame])
    return torch.cat([torch.cat([rows[j], newline]) if j in ends else rows[j] for j in range(frames)])


def _rows_of(tiles: torch.Tensor, per_tile: int) -> torch.Tensor:
    return (tiles[:, None] * per_tile + torch.arange(per_tile)).flatten()


__all__ = ["IMAGE_ROWS", "IMAGE_TILE", "PADDING_TILE", "TILE_FRAMES", "frame_owners", "grid_shares",
           "share_bounds", "split_media"]
