"""Names of the host bookkeeping a batch carries beside the model's own media tensors."""

from __future__ import annotations

IMAGE_ROWS = "image_rows"
"""LLaVA-OneVision batches: (images,) int64 feature rows of each image (its anyres grid, unpadded,
with its newlines: the placeholder tokens the processor made for it)."""
TILE_FRAMES = "tile_frames"
"""SmolVLM / SmolVLM2 batches: (B, N, 2) int64 per tile of ``pixel_values``, ``(frame, frames)``
for a video frame's tile, ``(-1, 0)`` for an image's, ``(-2, 0)`` for a padding tile."""
IMAGE_TILE, PADDING_TILE = -1, -2
GRID_THW = "grid_thw"
"""LLaVA-OneVision-1.5 batches carry no extra bookkeeping: ``image_grid_thw`` / ``video_grid_thw``
(one row per image or video: frames, patch rows, patch columns) say each item's feature rows."""

MEDIA_GRIDS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
"""LLaVA-OneVision-1.5, per kind of media: the patch rows and the grid that cuts them into items
(frames, patch rows, patch columns: t·h·w rows each)."""

HOST_KEYS = ("image_sizes", "batch_num_images", "image_grid_thw", "video_grid_thw")
"""Media metadata the models read on the host (LLaVA-OneVision's anyres grid per image, images
per sample: ``tolist()``, ``range(n)``; LLaVA-OneVision-1.5's patch grid per image and video): kept on the CPU by ``to_device``, so reading them
costs no device sync (dozens per optimizer step at accumulation 8)."""

__all__ = ["GRID_THW", "HOST_KEYS", "MEDIA_GRIDS", "IMAGE_ROWS", "IMAGE_TILE", "PADDING_TILE", "TILE_FRAMES"]
