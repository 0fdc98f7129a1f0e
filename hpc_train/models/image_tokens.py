"""SmolVLM's image-token count, proven once on the host instead of on the device every forward.

Idefics3 checks in every forward that the prompt's image tokens match the vision features
(``torch_compilable_check``, a device read). Our prompts come from the model's own processor,
which writes ``image_seq_len`` image tokens per tile of ``longest_edge`` pixels; the model makes
``(image_size / patch_size)^2 / scale_factor^2`` features per tile of ``image_size`` pixels.
When those agree, every batch we build passes that check, so a run checks it once here and
our forwards go without it (generation and any other call keep it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from hpc_train.errors import HpcTrainError

SKIP_CHECK = "TRANSFORMERS_DISABLE_TORCH_CHECK"


def smolvlm_tile_tokens(model_config: Any) -> int:
    """Image features the model makes per tile."""
    vision = model_config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // model_config.scale_factor ** 2


def image_tokens_always_match(model_config: Any, processor: Any, family_name: str) -> bool:
    """Whether the processor's image tokens always match the model's features (families whose
    tiles all cost the same tokens; True means the per-forward check can go). A disagreement
    fails here, before any step."""
    from hpc_train.models.families import get_family

    if not get_family(family_name).tile_tokens_fixed:
        return False
    per_tile, tile = smolvlm_tile_tokens(model_config), model_config.vision_config.image_size
    written = processor.image_seq_len
    edge = processor.image_processor.max_image_size["longest_edge"]
    # SmolVLM2's video frames are resized by the video processor, to its own tile size
    frame_edge = (getattr(getattr(processor, "video_processor", None), "max_image_size", None) or {}).get(
        "longest_edge", edge)
    if frame_edge != tile:
        raise HpcTrainError(
            f"the processor resizes video frames to {frame_edge}-pixel tiles, but the model makes its {per_tile} "
            f"features per {tile}-pixel tile, so no video sample could train. Fix: load the processor saved with this "
            "model (model.path), or set its video processor's max_image_size to the model's image_size")
    if written != per_tile or edge != tile:
        raise HpcTrainError(
            f"the processor writes {written} image tokens per {edge}-pixel tile, but the model makes {per_tile} "
            f"features per {tile}-pixel tile, so no image sample could train. Fix: load the processor saved with "
            "this model (model.path), or set the processor's image_seq_len and max_image_size to the model's")
    return True


def mark_image_tokens_checked(model: Any) -> None:
    """Let :func:`image_check_made` skip transformers' per-forward check for this model."""
    model._hpc_image_tokens_checked = True


@contextlib.contextmanager
def image_check_made(model: Any) -> Iterator[None]:
    """One forward of a marked model (through DeepSpeed's and PEFT's wrappers) without
    transformers' device check of its image tokens; the environment is as it was afterwards."""
    if not getattr(getattr(model, "module", model), "_hpc_image_tokens_checked", False) or SKIP_CHECK in os.environ:
        yield
        return
    os.environ[SKIP_CHECK] = "1"
    try:
        yield
    finally:
        del os.environ[SKIP_CHECK]


__all__ = ["image_check_made", "image_tokens_always_match", "mark_image_tokens_checked", "smolvlm_tile_tokens"]
