"""A forward that takes part of its media features from the frozen-vision cache.

A micro-batch under ``data.vision_cache`` carries :class:`CachedFeatures`: per kind of media
features, the cached rows and where they go among the rows the language model meets (one per
placeholder token, in token order), worked out on the host by the collator. The family's inner
model (:func:`use_cached_vision`) then encodes only the pixels the batch still has (samples not
cached yet, and a blank under ZeRO-3), puts the cached rows between them and hands the result
to transformers as precomputed encoder outputs (``mm_encoder_outputs``), so the tower runs on
exactly what was not cached, and not at all for a fully cached batch (unless ZeRO-3 needs every
rank to run it). Nothing in the tower or connector trains in such a run, so the encoding runs
without autograd; the rows it computed are kept for the cache to store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hpc_train.models.families import get_family


@dataclass
class KindRows:
    """One kind's feature rows in a micro-batch: ``total`` rows in token order, ``cached`` at
    positions ``cached_at``, the rest (``computed_at``) encoded from the batch's pixels."""

    total: int
    cached: torch.Tensor
    cached_at: torch.Tensor
    computed_at: torch.Tensor
    to_store: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    """``(entry key, positions among the computed rows)`` of each sample whose rows to store."""

    def merged(self, computed: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """All ``total`` rows on ``like``'s device and dtype, cached and ``computed`` in place."""
        count = 0 if computed is None else computed.shape[0]
        if count != len(self.computed_at):
            raise ValueError(f"the vision tower made {count} feature rows where the batch has "
                             f"{len(self.computed_at)} placeholder tokens without cached features")
        hidden = self.cached.shape[-1] if computed is None else computed.shape[-1]
        rows = torch.empty(self.total, hidden, dtype=like.dtype, device=like.device)
        if len(self.cached_at):
            rows.index_copy_(0, to(self.cached_at, rows.device), to(self.cached, rows.device).to(rows.dtype))
        if count:
            rows.index_copy_(0, to(self.computed_at, rows.device), computed.to(rows.dtype))
        return rows

    def pin_memory(self) -> KindRows:
        return KindRows(self.total, self.cached.pin_memory(), self.cached_at.pin_memory(),
                        self.computed_at.pin_memory(), [(key, at.pin_memory()) for key, at in self.to_store])


def to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from pinned memory without waiting for the device's queue."""
    return tensor.to(device, non_blocking=tensor.is_pinned())


@dataclass
class CachedFeatures:
    """A micro-batch's feature rows of every kind, and (once its forward ran) the rows computed."""

    root: str
    """The cache's folder, where the computed rows are stored."""
    kinds: dict[str, KindRows]
    samples_cached: int = 0
    samples_computed: int = 0
    """The batch's samples with media whose features came from the cache / are computed here."""
    computed: dict[str, torch.Tensor] = field(default_factory=dict)

    def pin_memory(self) -> CachedFeatures:
        """For a DataLoader's ``pin_memory``: the cached rows then reach the GPU without a wait."""
        return CachedFeatures(self.root, {k: v.pin_memory() for k, v in self.kinds.items()},
                              self.samples_cached, self.samples_computed)

    @property
    def bytes_read(self) -> int:
        """Bytes of cached rows the batch carries (read from the cache)."""
        return sum(k.cached.numel() * k.cached.element_size() for k in self.kinds.values())


_BATCH: ContextVar[CachedFeatures | None] = ContextVar("cached_vision_features", default=None)


@contextlib.contextmanager
def cached_features_for(features: CachedFeatures) -> Iterator[None]:
    """One forward of a micro-batch that carries ``features``."""
    token = _BATCH.set(features)
    try:
        yield
    finally:
        _BATCH.reset(token)


def use_cached_vision(inner: torch.nn.Module, family_name: str) -> None:
    """Make ``inner`` (the family's model holding tower and language model) take cached features
    in forwards run under :func:`cached_features_for`; other forwards are unchanged."""
    if takes_cached_vision(inner):
        return
    original = inner.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        features = _BATCH.get()
        if features is None:
            return original(*args, **kwargs)
        kwargs.pop("mm_encoder_outputs", None)
        outputs = merged_features(inner, family_name, kwargs, features)
        return original(*args, **kwargs, mm_encoder_outputs=outputs or None)

    inner.forward = forward
    inner._hpc_cached_vision = True


def takes_cached_vision(inner: torch.nn.Module) -> bool:
    """Whether :func:`use_cached_vision` was applied to ``inner``."""
    return getattr(inner, "_hpc_cached_vision", False)


def merged_features(inner: torch.nn.Module, family_name: str, inputs: dict[str, Any],
                    features: CachedFeatures) -> dict[str, BaseModelOutputWithPooling]:
    """Each kind's rows for the language model, as transformers takes precomputed ones: the
    pixels in ``inputs`` (removed from it) encoded, the cached rows put between them. The rows
    encoded here are left in ``features.computed``."""
    family = get_family(family_name)
    # The parameter as iterated, not as an attribute: reading ``.weight`` in a forward makes
    # ZeRO-3 gather the embeddings and keep them whole until the forward ends.
    like = next(inner.get_input_embeddings().parameters())
    outputs = {}
    for kind, rows in features.kinds.items():
        names = family.pixel_inputs[kind]
        pixels = {name: inputs.pop(name, None) for name in names}
        computed = None
        if pixels[names[0]] is not None:
            with torch.no_grad():
                computed = family.feature_encoders[kind](inner, pixels, inputs)
            features.computed[kind] = computed
        if rows.total:
            merged = rows.merged(computed, like)
            outputs[kind] = BaseModelOutputWithPooling(pooler_output=merged[None] if kind == "video" else [merged])
    return outputs


__all__ = ["CachedFeatures", "KindRows", "cached_features_for", "merged_features", "takes_cached_vision",
           "use_cached_vision"]
