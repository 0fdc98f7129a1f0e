"""What a processor's output says about each media item of a sample, and what it needs to be told.

- :func:`expand` / :func:`shift`: the text as the processor expanded its media placeholders, and
  where a character of the unexpanded text lands in it.
- :func:`tile_frames` / :func:`image_rows`: the host bookkeeping by which sequence parallelism
  shares the vision work (which video frame each tile shows; each image's feature rows).
- :func:`video_inputs`: a family's processor arguments for decoded videos (SmolVLM2's fps and
  timestamps).
- :func:`pixels_in_token_order`: SmolVLM2's processor puts a sample's images and videos under one
  ``pixel_values``; with both in one call the videos' overwrite the images'.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from hpc_train.data.decoding.media import VideoFrames
from hpc_train.errors import DataError
from hpc_train.models.families import Family
from hpc_train.models.media_keys import IMAGE_TILE


def tile_frames(image_frames: list[tuple[int, int] | list[tuple[int, int]]], replacements: list[dict],
                 image_token: str, per_tile: int, tiles: int) -> torch.Tensor:
    """(tiles, 2): each item's tags for each of its tiles, whose number the processor's expansion
    of that item tells (``per_tile`` placeholders a tile)."""
    if all(tag == (IMAGE_TILE, 0) for tag in image_frames):
        return torch.tensor([IMAGE_TILE, 0]).repeat(tiles, 1)
    counts = [rep["replacement"].count(image_token) // per_tile
              for rep in sorted(replacements, key=lambda r: r["span"][0]) if image_token in rep["replacement"]]
    if len(counts) != len(image_frames) or sum(counts) != tiles:
        raise DataError(f"the processor expanded {len(counts)} media items into {sum(counts)} tiles, but made "
                        f"{tiles} tiles of {len(image_frames)} items", fix="report this with the model's processor config")
    tags = []
    for tag, count in zip(image_frames, counts, strict=True):
        if isinstance(tag, list) and len(tag) != count:
            raise DataError(f"the processor made {count} tiles of a {len(tag)}-frame video (one a frame expected)",
                            fix="report this with the model's processor config")
        tags.append(torch.tensor(tag).view(-1, 2) if isinstance(tag, list) else torch.tensor([tag]).repeat(count, 1))
    return torch.cat(tags)


def still(frames: np.ndarray | VideoFrames) -> VideoFrames:
    """``frames`` as a video sampled at one frame a second (a blank video has no file)."""
    if isinstance(frames, VideoFrames):
        return frames
    return VideoFrames(frames=frames, timestamps=np.arange(len(frames), dtype=np.float64), native_fps=1.0,
                       num_source_frames=len(frames))


def video_inputs(family: Family, videos: list[VideoFrames]) -> dict[str, Any]:
    return family.video_inputs(videos) if family.video_inputs else {}


def pixels_in_token_order(processor: Any, images: list[Image.Image], kwargs: dict[str, Any], out: Any
                          ) -> dict[str, torch.Tensor]:
    """A sample's image tiles and video frames, in the order of their tokens: each kind processed
    on its own, interleaved as the processor's expansion of the text places them. (SmolVLM2's
    processor returns both under one ``pixel_values``, the videos' replacing the images', and a
    sample's videos stacked as a batch of videos.)"""
    options = {k: v for k, v in kwargs.items() if k in ("video_metadata", "do_sample_frames")}
    image_tiles = []
    if images:
        image_out = processor.image_processor(images=[images], return_tensors="pt")
        image_tiles = list(zip(image_out["pixel_values"][0], image_out["pixel_attention_mask"][0], strict=True))
    video_out = processor.video_processor(videos=kwargs["videos"], return_tensors="pt", **options)
    frames = [list(zip(v, m, strict=True)) for v, m in
              zip(video_out["pixel_values"], video_out["pixel_attention_mask"], strict=True)]
    per_tile = processor.image_seq_len
    tiles = []
    for rep in sorted(out["text_replacement_offsets"][0], key=lambda r: r["span"][0]):
        count = rep["replacement"].count(processor.image_token) // per_tile
        if rep["type"] == "video":
            tiles += frames.pop(0)[:count]  # a shorter video's padding frames come last
        else:
            tiles += [image_tiles.pop(0) for _ in range(count)]
    return {"pixel_values": torch.stack([t for t, _ in tiles])[None],
            "pixel_attention_mask": torch.stack([m for _, m in tiles])[None]}


def image_rows(replacements: list[dict], image_token: str, ids: torch.Tensor, image_token_id: int,
                images: int) -> torch.Tensor:
    """(images,): each image's placeholder tokens (its feature rows), from the processor's
    expansion of each image (or, for one image, from the token ids)."""
    counts = [rep["replacement"].count(image_token)
              for rep in sorted(replacements, key=lambda r: r["span"][0]) if image_token in rep["replacement"]]
    if not counts and images == 1:
        counts = [int((ids == image_token_id).sum())]
    if len(counts) != images:
        raise DataError(f"the processor expanded {len(counts)} images but made pixels of {images}",
                        fix="report this with the model's processor config")
    return torch.tensor(counts)


def shift(position: int, replacements: list[dict]) -> int:
    """Where a character of the unexpanded text lands after the media expansions before it."""
    delta = 0
    for rep in replacements:
        start, end = rep["span"]
        if end <= position:
            new_start, new_end = rep["new_span"]
            delta += (new_end - new_start) - (end - start)
    return position + delta


def expand(text: str, spans: list[tuple[int, int]], replacements: list[dict]
            ) -> tuple[str, list[int], list[tuple[int, int]]]:
    """The expanded text, the cut points between pieces (the answers' bounds), and the media
    expansions' ranges."""
    parts: list[str] = []
    cursor = 0
    for rep in sorted(replacements, key=lambda r: r["span"][0]):
        start, end = rep["span"]
        parts.append(text[cursor:start])
        parts.append(rep["replacement"])
        cursor = end
    parts.append(text[cursor:])
    expanded = "".join(parts)
    media_ranges = [tuple(rep["new_span"]) for rep in replacements]
    cuts = {0, len(expanded)}
    for s, e in spans:
        cuts.update((shift(s, replacements), shift(e, replacements)))
    return expanded, sorted(cuts), media_ranges


__all__ = ["expand", "image_rows", "pixels_in_token_order", "shift", "still", "tile_frames", "video_inputs"]
