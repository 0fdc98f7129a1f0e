"""How each family's media tensors are laid out: for one sample, a padded batch, a packed row.

- SmolVLM (Idefics3): ``pixel_values`` (B, N, 3, H, W) and ``pixel_attention_mask``
  (B, N, H, W), N the most tiles of any sample; padding tiles are all zero, which Idefics3
  recognises and drops. A packed row is one sample of all the row's tiles. ``tile_frames``
  says which video frame each tile shows (host bookkeeping for sequence parallelism).
- LLaVA-OneVision: images of all samples concatenated, ``pixel_values`` (I, P, 3, h, w) with
  P the most anyres patches, ``image_sizes`` (I, 2) and ``batch_num_images`` (B,); videos
  concatenated as ``pixel_values_videos`` (V, F, 3, h, w), so they need one frame count.
  ``image_rows`` says how many feature rows each image makes (host bookkeeping for sequence
  parallelism).

Chosen once per family (:func:`media_layout`); nothing else branches on the family's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hpc_train.data.media_share import IMAGE_ROWS, IMAGE_TILE, PADDING_TILE, TILE_FRAMES
from hpc_train.errors import DataError

if TYPE_CHECKING:
    from hpc_train.data.tokenize import EncodedSample


class MediaLayout:
    """One family's media layout."""

    def sample(self, processor_out: Any) -> dict[str, torch.Tensor]:
        """One sample's media tensors, without a batch dimension, from the processor's output."""
        raise NotImplementedError

    def batch(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        """The media of a padded batch of ``samples``."""
        raise NotImplementedError

    def packed_row(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        """The media of one packed row holding ``samples``."""
        raise NotImplementedError


class Idefics3Layout(MediaLayout):
    def sample(self, processor_out: Any) -> dict[str, torch.Tensor]:
        if "pixel_values" not in processor_out:
            return {}
        return {"pixel_values": processor_out["pixel_values"][0],
                "pixel_attention_mask": processor_out["pixel_attention_mask"][0].bool()}

    def batch(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        return _idefics3_batch(samples)

    def packed_row(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        tiles = [s.media["pixel_values"] for s in samples if "pixel_values" in s.media]
        if not tiles:
            return {}
        masks = [s.media["pixel_attention_mask"] for s in samples if "pixel_values" in s.media]
        frames = torch.cat([_tile_frames(s) for s in samples if "pixel_values" in s.media])[None]
        return {**_unless_full({"pixel_values": torch.cat(tiles)[None], "pixel_attention_mask": torch.cat(masks)[None]},
                               masks), TILE_FRAMES: frames}


class LlavaOneVisionLayout(MediaLayout):
    def sample(self, processor_out: Any) -> dict[str, torch.Tensor]:
        media: dict[str, torch.Tensor] = {}
        if "pixel_values" in processor_out:
            media["pixel_values"] = processor_out["pixel_values"]
            media["image_sizes"] = processor_out["image_sizes"]
        if "pixel_values_videos" in processor_out:
            media["pixel_values_videos"] = processor_out["pixel_values_videos"]
        return media

    def batch(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        return llava_onevision_media(samples)

    def packed_row(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        return llava_onevision_media(samples, packed=True)


HOST_KEYS = ("image_sizes", "batch_num_images")
"""Media metadata the models read on the host (LLaVA-OneVision's anyres grid per image, images
per sample: ``tolist()``, ``range(n)``): kept on the CPU by ``to_device``, so reading them
costs no device sync (dozens per optimizer step at accumulation 8)."""

LAYOUTS: dict[str, MediaLayout] = {"smolvlm": Idefics3Layout(), "llava_onevision": LlavaOneVisionLayout()}


def media_layout(family_name: str) -> MediaLayout:
    """The layout of the family called ``family_name``."""
    return LAYOUTS[family_name]


def _idefics3_batch(samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
    tiles = [s.media.get("pixel_values") for s in samples]
    if all(t is None for t in tiles):
        return {}
    present = [t for t in tiles if t is not None]
    n = max(t.shape[0] for t in present)
    channels = present[0].shape[1]
    height = max(t.shape[-2] for t in present)
    width = max(t.shape[-1] for t in present)
    pixels = torch.zeros(len(samples), n, channels, height, width, dtype=present[0].dtype)
    mask = torch.zeros(len(samples), n, height, width, dtype=torch.bool)
    frames = torch.tensor([PADDING_TILE, 0]).repeat(len(samples), n, 1)
    for i, s in enumerate(samples):
        if "pixel_values" not in s.media:
            continue
        t, m = s.media["pixel_values"], s.media["pixel_attention_mask"]
        pixels[i, : t.shape[0], :, : t.shape[-2], : t.shape[-1]] = t
        mask[i, : m.shape[0], : m.shape[-2], : m.shape[-1]] = m
        frames[i, : t.shape[0]] = _tile_frames(s)
    real = [s.media["pixel_attention_mask"] for s in samples if "pixel_values" in s.media]
    return {**_unless_full({"pixel_values": pixels, "pixel_attention_mask": mask}, real, (height, width)),
            TILE_FRAMES: frames}


def _tile_frames(sample: EncodedSample) -> torch.Tensor:
    """Which video frame each tile of ``sample`` shows (all images when the encoder did not say)."""
    if TILE_FRAMES in sample.media:
        return sample.media[TILE_FRAMES]
    return torch.tensor([IMAGE_TILE, 0]).repeat(len(sample.media["pixel_values"]), 1)


def _unless_full(media: dict[str, torch.Tensor], masks: Sequence[torch.Tensor],
                 size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """``media`` without ``pixel_attention_mask`` when every real tile's mask is all true at
    the batch's tile ``size`` (Idefics3 drops the all-zero padding tiles before it reads a
    mask, and makes an all-true one when given none): the model then has nothing to mask,
    which the host knows here for free."""
    if all(bool(m.all()) and (size is None or tuple(m.shape[-2:]) == size) for m in masks):
        media = {k: v for k, v in media.items() if k != "pixel_attention_mask"}
    return media


def llava_onevision_media(samples: Sequence[EncodedSample], *, packed: bool = False) -> dict[str, torch.Tensor]:
    """The media of several samples in LLaVA-OneVision's layout (padded rows and packed rows alike).

    ``batch_num_images`` is per sample: LLaVA-OneVision tiles a lone image (anyres) but not
    the images of a multi-image sample, and the processor counted tokens that way.
    """
    out: dict[str, torch.Tensor] = {}
    images = [s.media["pixel_values"] for s in samples if "pixel_values" in s.media]
    if images:
        patches = max(t.shape[1] for t in images)
        out["pixel_values"] = torch.cat(
            [F.pad(t, (0, 0, 0, 0, 0, 0, 0, patches - t.shape[1])) for t in images])
        out["image_sizes"] = torch.cat([s.media["image_sizes"] for s in samples if "image_sizes" in s.media])
        out["batch_num_images"] = torch.tensor(
            [s.media["pixel_values"].shape[0] if "pixel_values" in s.media else 0 for s in samples])
        if all(IMAGE_ROWS in s.media for s in samples if "pixel_values" in s.media):
            out[IMAGE_ROWS] = torch.cat([s.media[IMAGE_ROWS] for s in samples if "pixel_values" in s.media])
    videos = [s.media["pixel_values_videos"] for s in samples if "pixel_values_videos" in s.media]
    if videos:
        frames = {v.shape[1] for v in videos}
        if len(frames) > 1:
            ids = [s.id for s in samples if "pixel_values_videos" in s.media]
            raise DataError(
                f"videos with different frame counts {sorted(frames)} in one {'packed row' if packed else 'batch'} "
                f"(samples {ids}); LLaVA-OneVision stacks them",
                fix=f"data.video.sampling=uniform data.video.num_frames={min(frames)} (one count for every video), "
                    + ("or data.packing=false with train.micro_batch_size=1" if packed else "or micro_batch_size=1"))
        out["pixel_values_videos"] = torch.cat(videos)
    return out


__all__ = ["HOST_KEYS", "LAYOUTS", "MediaLayout", "media_layout"]
