"""Whether a run uses ``data.vision_cache``, and the cache it opens.

A run uses it when it trains (a baseline only evaluates), its vision tower and connector are
frozen, and its samples are whole on each rank (under sequence parallelism a group shares each
sample's vision work: not cached yet). Otherwise the run says in one line why it is off and
trains as without it. The weights digest needs every rank's whole tower: under ZeRO-3 it is
gathered for the digest (collective).
"""

from __future__ import annotations

from torch import nn

from hpc_train.config import RunConfig
from hpc_train.data.caches.feature_store import FeatureStore
from hpc_train.data.caches.vision_cache import VisionCache, cache_prefix
from hpc_train.data.caches.vision_cache_keys import (
    VISION_GROUPS,
    cache_refusal,
    processing_digest,
    vision_weights_digest,
)
from hpc_train.models.adapters import group_of
from hpc_train.models.cached_vision import use_cached_vision
from hpc_train.models.families import Family
from hpc_train.models.sequence_parallel import media_token_ids
from hpc_train.train.gathered import gathered
from hpc_train.train.trainable_model import LoadedModel


def vision_cache_refusal(config: RunConfig, loaded: LoadedModel) -> str | None:
    """Why this run cannot use its ``data.vision_cache`` (``None``: it can, or none is set)."""
    return model_cache_refusal(config, loaded.model, loaded.family)


def model_cache_refusal(config: RunConfig, model: nn.Module, family: Family) -> str | None:
    """:func:`vision_cache_refusal` of a prepared ``model`` (a plan's fake one too)."""
    if config.data.vision_cache is None or config.train.mode == "baseline":
        return None
    if config.train.sequence_parallel > 1:
        return ("data.vision_cache is off for this run: under train.sequence_parallel each sample's vision work "
                "is shared over its group. Fix, to use it: train.sequence_parallel=1")
    return cache_refusal(model, family)


def open_vision_cache(config: RunConfig, loaded: LoadedModel) -> VisionCache:
    """The run's cache (collective under ZeRO-3), its model set to take cached features."""
    family = loaded.family
    with gathered(p for name, p in loaded.model.named_parameters() if group_of(name, family) in VISION_GROUPS):
        weights = vision_weights_digest(loaded.model, family)
    prefix = cache_prefix(family_name=family.name, weights=weights, dtype=loaded.dtype,
                          processing=processing_digest(config.data, loaded.processor))
    use_cached_vision(family.inner_model(loaded.model), family.name)
    return VisionCache(store=FeatureStore(config.vision_cache_dir), prefix=prefix,
                       token_ids=media_token_ids(loaded.model.config, family.name),
                       video_as_images=family.video_as_images)


__all__ = ["model_cache_refusal", "open_vision_cache", "vision_cache_refusal"]
