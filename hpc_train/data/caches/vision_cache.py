"""The frozen-vision feature cache as the data pipeline sees it: the entries a training sample's
features live under, and whether a sample can be trained from them.

A sample's features are cached whole, one entry per kind of media features (``image``;
LLaVA-OneVision also ``video``), in the order the language model meets them: LLaVA-OneVision
gives a lone image more rows (anyres) than each image of a multi-image sample, so an image's
features depend on the sample it is in. A sample's key covers everything its features depend
on: the run's prefix (tower and connector weights, processing, dtype: :func:`cache_prefix`),
each media file's identity in placeholder order, and the video clip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from hpc_train.data.caches.feature_store import FORMAT, FeatureStore, key_of, media_identity
from hpc_train.data.encoding.tokenize import EncodedSample
from hpc_train.data.sources.records import Record
from hpc_train.models.cached_vision import CachedFeatures, KindRows

_PLACEHOLDERS = re.compile(r"<image>|<video>|<speech>")


def cache_prefix(*, family_name: str, weights: str, processing: str, dtype: torch.dtype) -> str:
    """What every entry of one run depends on besides its own media (digests from
    :mod:`hpc_train.data.caches.vision_cache_keys`)."""
    return key_of(FORMAT, family_name, weights, processing, str(dtype))


def feature_kinds(record: Record, video_as_images: bool) -> tuple[str, ...]:
    """The kinds of media features a record's sample has (SmolVLM sees every medium as images)."""
    as_images = bool(record.images or record.audios or (video_as_images and record.videos))
    kinds = ("image",) if as_images else ()
    return (*kinds, "video") if record.videos and not video_as_images else kinds


@dataclass(frozen=True)
class VisionCache:
    """A run's feature store and what its keys depend on (picklable into DataLoader workers)."""

    store: FeatureStore
    prefix: str
    token_ids: dict[str, int]
    """The placeholder token of each kind: a feature row per such token."""
    video_as_images: bool

    def sample_key(self, record: Record) -> str:
        """The key of ``record``'s features; ``OSError`` when a media file cannot be stat'ed."""
        order = "".join(m[1] for m in _PLACEHOLDERS.findall(" ".join(t.text for t in record.turns)))
        media = [f"{kind}:{media_identity(p)}" for kind, paths in
                 (("image", record.images), ("video", record.videos), ("audio", record.audios)) for p in paths]
        return key_of(self.prefix, order, repr(record.video_clip), *media)

    def load(self, record: Record, sample_key: str) -> dict[str, torch.Tensor] | None:
        """Every kind of ``record``'s features, or ``None`` unless all are stored and whole."""
        features = {}
        for kind in feature_kinds(record, self.video_as_images):
            rows = self.store.load(entry_key(sample_key, kind))
            if rows is None:
                return None
            features[kind] = rows
        return features or None

    def fits(self, sample: EncodedSample, features: dict[str, torch.Tensor]) -> bool:
        """Whether ``features`` has exactly one row per placeholder token of ``sample``, per kind
        (an entry written under other token counts is stale)."""
        for kind, token in self.token_ids.items():
            rows = features.get(kind)
            if int((sample.input_ids == token).sum()) != (0 if rows is None else rows.shape[0]):
                return False
        return True


def entry_key(sample_key: str, kind: str) -> str:
    """The entry of one kind of a sample's features."""
    return key_of(sample_key, kind)


VISION_FEATURES = "vision_features"
"""A batch's :class:`CachedFeatures` (for the loss's forward, not a model input)."""

CACHED, NOT_STORED = -1, -2
"""Owners of a batch's tokens besides the samples to store (their index in the batch's keys)."""


@dataclass(frozen=True)
class FeatureCollation:
    """How a collator of a run with the cache lays out its batches' feature rows."""

    root: str
    token_ids: dict[str, int]
    blank_when_cached: bool
    """ZeRO-3: a batch whose samples of a kind are all cached still gets that kind's blank, so
    every rank runs the tower (its layers are gathered collectively)."""

    def has_kind(self, sample: EncodedSample, blank: EncodedSample) -> bool:
        """Whether ``sample`` holds cached features of ``blank``'s kind that spare the blank."""
        kind = "video" if "pixel_values_videos" in blank.media else "image"
        return not self.blank_when_cached and bool(sample.features) and kind in sample.features

    def rows(self, input_ids: torch.Tensor, owners: torch.Tensor, samples: list[EncodedSample],
             keys: list[str]) -> CachedFeatures:
        """The batch's :class:`CachedFeatures`; ``owners``: per token of ``input_ids``, the token's
        sample as :func:`token_owners` gave it (``NOT_STORED`` for blanks and padding)."""
        input_ids, owners = input_ids.reshape(-1), owners.reshape(-1)
        kinds = {}
        for kind, token in self.token_ids.items():
            owner = owners[input_ids == token]
            computed_at = (owner != CACHED).nonzero().flatten()
            cached = [s.features[kind] for s in samples if s.features and kind in s.features]
            kinds[kind] = KindRows(
                total=len(owner), cached=torch.cat(cached) if cached else torch.zeros(0, 0),
                cached_at=(owner == CACHED).nonzero().flatten(), computed_at=computed_at,
                to_store=[(entry_key(key, kind), at) for k, key in enumerate(keys)
                          if len(at := (owner[computed_at] == k).nonzero().flatten())])
        return CachedFeatures(self.root, kinds, samples_cached=sum(1 for s in samples if s.features),
                              samples_computed=sum(1 for s in samples if s.feature_key is not None))


def token_owners(sample: EncodedSample, keys: list[str]) -> torch.Tensor:
    """``sample``'s tokens marked with whose features they meet: ``CACHED``, the index of its key
    in ``keys`` (appended) when its computed features are to be stored, or ``NOT_STORED``."""
    if sample.features:
        owner = CACHED
    elif sample.feature_key is not None:
        keys.append(sample.feature_key)
        owner = len(keys) - 1
    else:
        owner = NOT_STORED
    return torch.full((len(sample),), owner, dtype=torch.long)


__all__ = ["CACHED", "NOT_STORED", "VISION_FEATURES", "FeatureCollation", "VisionCache", "cache_prefix", "entry_key", "feature_kinds",
           "token_owners"]
