"""What the frozen-vision feature cache's entries depend on, and when a run may use them.

Cached features are what the connector hands the language model. They stay valid while the
vision tower's and the connector's weights, the processor's settings and the run's media
settings stay what they were when the entry was written, and the media file is the same file:
each goes into the keys (with :func:`hpc_train.data.caches.feature_store.media_identity` for files).
A run that trains anything in the tower or the connector (unfrozen, or LoRA over them) changes
those features every step, so it cannot use the cache at all: :func:`cache_refusal` says why.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from hpc_train.config import DataConfig
from hpc_train.data.caches.feature_store import tensors_digest
from hpc_train.data.decoding.media import video_settings
from hpc_train.models.adapters import bare_name, group_of, param_census
from hpc_train.models.families import Family

VISION_GROUPS = ("vision", "connector")
"""The module groups whose output the cache holds."""


def cache_refusal(model: nn.Module, family: Family) -> str | None:
    """Why this prepared model (freezing and adapters applied) cannot use cached features, or
    ``None`` when the tower and the connector are frozen."""
    census = param_census(model, family)
    moving = [f"{group} ({'LoRA' if census[group].lora else 'trained'})" for group in VISION_GROUPS
              if census[group].trainable or census[group].lora]
    if not moving:
        return _dropout_refusal(model, family)
    return (f"data.vision_cache is off for this run: the {' and the '.join(moving)} change the cached "
            "features every step. Fix, to use it: model.freeze=[vision, connector] with train.mode=full, "
            "or lora.target=llm")


def _dropout_refusal(model: nn.Module, family: Family) -> str | None:
    """A tower or connector with dropout makes other features every training step."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    rates = [m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout)
             and group_of(name, family) in VISION_GROUPS]
    rates.append(float(getattr(vision, "attention_dropout", 0.0) or 0.0))
    if max(rates) <= 0:
        return None
    return (f"data.vision_cache is off for this run: the vision tower or connector has dropout ({max(rates)}), so "
            "its features change every training step. Fix, to use it: a model config with vision dropout 0")


def vision_weights_digest(model: nn.Module, family: Family) -> str:
    """A digest of the tower's and the connector's parameters and buffers (names as in the bare
    model, so an adapter-wrapped language model does not change it). Whole tensors are needed:
    take it before ZeRO-3 partitions them."""
    named = {bare_name(name): tensor for name, tensor in _named_tensors(model)
             if "lora_" not in name and group_of(name, family) in VISION_GROUPS}
    return tensors_digest(named)


def _named_tensors(model: nn.Module) -> list[tuple[str, Any]]:
    return [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if b is not None)]


def processing_digest(data: DataConfig, processor: Any) -> str:
    """A digest of what turns a media file into pixels: the run's image, video and audio
    settings and the processor's image and video settings."""
    settings = {"image": data.image.model_dump(), "video": video_settings(data.video),
                "audio": data.audio.model_dump()}
    for part in ("image_processor", "video_processor"):
        sub = getattr(processor, part, None)
        if sub is not None:
            settings[part] = sub.to_dict()
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


__all__ = ["VISION_GROUPS", "cache_refusal", "processing_digest", "vision_weights_digest"]
