"""Decoded video frames as a family's own video processor first resizes them, kept as uint8
frames: what a prepared-media store holds (``data.prepared_media``), so a prepared sample is
smaller than the decoded one and the processor's work on it is the same as on the decoded frames.

The resize is the processor's own (its ``resize`` with its ``size`` and ``resample``), never
ours; whether feeding its output back gives the processor's output for the decoded frames is
proven per processor when a store opens (:func:`~hpc_train.data.caches.prepared_media.resize_is_exact`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers.image_processing_utils import SizeDict


def processor_resize(video_processor: Any, frames: np.ndarray, **resize_kwargs: Any) -> np.ndarray:
    """``frames`` (T, H, W, 3 uint8) after ``video_processor.resize`` with its own settings."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).unsqueeze(0)
    size = video_processor.size
    size = size if isinstance(size, SizeDict) else SizeDict(**size)
    resized = video_processor.resize(video, size=size, resample=video_processor.resample, **resize_kwargs)
    if resized.dtype != torch.uint8:
        raise TypeError(f"{type(video_processor).__name__}.resize turned uint8 frames into {resized.dtype}")
    return resized[0].permute(0, 2, 3, 1).contiguous().numpy()


def video_processor_frames(processor: Any, frames: np.ndarray) -> np.ndarray:
    """SmolVLM2's and LLaVA-OneVision's video processors: one resize of their own ``size``."""
    return processor_resize(processor.video_processor, frames)


def qwen2_vl_frames(processor: Any, frames: np.ndarray) -> np.ndarray:
    """Qwen2-VL's video processor (LLaVA-OneVision-1.5): its ``smart_resize`` to multiples of the
    merged patch, capped per frame as the run calls it."""
    vp = processor.video_processor
    return processor_resize(vp, frames, factor=vp.patch_size * vp.merge_size, temporal_factor=vp.temporal_patch_size,
                            cap_pixels_per_frame=bool(getattr(vp, "cap_pixels_per_frame", None)))


__all__ = ["processor_resize", "qwen2_vl_frames", "video_processor_frames"]
