"""Padded batches of encoded samples; each family's media tensors are laid out by its
:class:`~hpc_train.models.families.MediaLayout` (``Family.layout``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hpc_train.data.caches.vision_cache import (
    NOT_STORED,
    VISION_FEATURES,
    FeatureCollation,
    token_owners,
)
from hpc_train.data.dataset import Skipped
from hpc_train.data.encoding.loss_positions import LOSS_KEYS, loss_positions, num_supervised
from hpc_train.data.encoding.tokenize import IGNORE_INDEX, EncodedSample
from hpc_train.models.families import Family
from hpc_train.models.media_keys import IMAGE_ROWS, TILE_FRAMES


class Collator:
    """Collate :class:`EncodedSample` items (dropping :class:`Skipped` ones, counted)."""

    def __init__(self, family: Family, pad_token_id: int, *, pad_to_multiple_of: int | None = None,
                 blanks: Sequence[EncodedSample] = (), padding_side: str = "right",
                 features: FeatureCollation | None = None) -> None:
        """``blanks``: snippets from :meth:`ChatEncoder.blank_media`; a batch lacking a media
        kind gets that blank added to its first sample, masked and unsupervised, on the
        padding side (``left`` for generation prompts, which must end with the prompt).
        ``features``: the vision cache's layout of batches (``data.vision_cache``)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        self.padding_side = padding_side
        self.family = family
        self.layout = family.layout
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.blanks = list(blanks)
        self.features = features

    def __call__(self, items: Sequence[EncodedSample | Skipped]) -> dict[str, Any]:
        samples = [s for s in items if isinstance(s, EncodedSample)]
        skipped = [s for s in items if isinstance(s, Skipped)]
        batch: dict[str, Any] = {
            "sample_ids": [s.id for s in samples],
            "skipped": skipped,
            "num_skipped": len(skipped),
        }
        if not samples:
            return batch
        left = self.padding_side == "left"
        keys: list[str] = []
        owners = [token_owners(s, keys) for s in samples] if self.features else None
        for blank in self.blanks:
            if not any(has_media_kind(s, blank) or (self.features and self.features.has_kind(s, blank))
                       for s in samples):
                samples = [_add_blank(samples[0], blank, at_start=left), *samples[1:]]
                if owners:
                    extra = torch.full((len(blank),), NOT_STORED)
                    owners[0] = torch.cat([extra, owners[0]] if left else [owners[0], extra])
        length = max(len(s) for s in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch["input_ids"] = torch.stack([_pad1d(s.input_ids, length, self.pad_token_id, left) for s in samples])
        batch["labels"] = torch.stack([_pad1d(s.labels, length, IGNORE_INDEX, left) for s in samples])
        batch["attention_mask"] = torch.stack([_pad1d(_mask(s), length, 0, left) for s in samples])
        batch["num_real_tokens"] = int(batch["attention_mask"].sum())
        batch["num_slots"] = int(batch["attention_mask"].numel())
        batch["num_supervised"] = num_supervised(batch["labels"])
        batch["videos_unprepared"] = sum(s.videos_unprepared for s in samples)
        batch.update(loss_positions(batch["labels"]))
        if not left and batch["num_real_tokens"] == batch["num_slots"]:
            # Nothing to mask: causal attention alone is exact, and transformers would read the
            # mask on the device every forward to find that out (generation keeps its mask).
            del batch["attention_mask"]
        batch.update(self.layout.batch(samples))
        if owners is not None:
            batch[VISION_FEATURES] = self.features.rows(
                batch["input_ids"], torch.stack([_pad1d(o, length, NOT_STORED, left) for o in owners]), samples, keys)
        return batch


BOOKKEEPING = ("sample_ids", "skipped", "num_skipped", "num_real_tokens", "num_slots", "num_supervised", TILE_FRAMES,
               IMAGE_ROWS, "videos_unprepared")


class FloatCast:
    """A collator whose floating-point tensors (pixels) come out in ``dtype``: cast in the
    DataLoader's workers, so a bf16 run copies half the bytes to the GPU and its main process
    casts nothing (the same rounding as a cast on the GPU)."""

    def __init__(self, collate: Callable[[Sequence[Any]], dict[str, Any]], dtype: torch.dtype) -> None:
        self.collate = collate
        self.dtype = dtype

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        return {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in self.collate(items).items()}


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a batch that go into ``model(**...)`` (bookkeeping, the loss's positions and
    cached features removed)."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING and k not in LOSS_KEYS and k != VISION_FEATURES}


def step_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What a training or evaluation step takes: the model's inputs and the loss's positions."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING}


def has_media_kind(sample: EncodedSample, blank: EncodedSample) -> bool:
    """Whether ``sample`` carries the media kind of a blank snippet (image / video)."""
    return any(key in sample.media for key in blank.media if key != "image_sizes")


def _add_blank(sample: EncodedSample, blank: EncodedSample, *, at_start: bool) -> EncodedSample:
    """``sample`` with a masked blank snippet before or after it, media in placeholder order."""
    first, second = (blank, sample) if at_start else (sample, blank)
    media = dict(first.media)
    for key, value in second.media.items():
        media[key] = torch.cat([media[key], value]) if key in media else value
    return EncodedSample(
        id=sample.id, input_ids=torch.cat([first.input_ids, second.input_ids]),
        labels=torch.cat([first.labels, second.labels]), media=media,
        num_media_tokens=sample.num_media_tokens + blank.num_media_tokens, answers=sample.answers,
        masked_head=sample.masked_head + (len(blank) if at_start else 0),
        masked_tail=sample.masked_tail + (0 if at_start else len(blank)),
        features=sample.features, feature_key=sample.feature_key)


def _mask(sample: EncodedSample) -> torch.Tensor:
    mask = torch.ones(len(sample), dtype=torch.long)
    mask[: sample.masked_head] = 0
    mask[len(sample) - sample.masked_tail:] = 0
    return mask


def _pad1d(t: torch.Tensor, length: int, value: int, left: bool = False) -> torch.Tensor:
    pad = length - t.numel()
    return F.pad(t, (pad, 0) if left else (0, pad), value=value)
