"""A real batch made fake for the planned step, with what the model reads from its values
answered from the real batch.

Fake tensors have shapes but no values, so the few places where a model's forward depends on
tensor *values* must be told them: Idefics3 drops all-zero padding tiles (a boolean index)
and splits the features by real tiles per sample (a host read); LLaVA-OneVision counts
patches from ``image_sizes`` and ``batch_num_images``; both families check media tokens
against features. The facts come from the real batch before anything is faked.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from hpc_train.models.cached_vision import CachedFeatures, KindRows
from hpc_train.models.media_keys import HOST_KEYS


def uncached_features(input_ids: torch.Tensor, token_ids: dict[str, int]) -> CachedFeatures:
    """What a run with ``data.vision_cache`` sends with a micro-batch in its first epoch: no
    feature row cached yet, each placeholder's row computed (and, in a plan, nothing stored)."""
    kinds = {}
    for kind, token in token_ids.items():
        total = int((input_ids == token).sum())
        kinds[kind] = KindRows(total=total, cached=torch.zeros(0, 0), cached_at=torch.zeros(0, dtype=torch.long),
                               computed_at=torch.arange(total))
    return CachedFeatures(root="", kinds=kinds)


def fake_batch(batch: dict[str, Any], mode: FakeTensorMode) -> dict[str, Any]:
    """``batch`` with every tensor fake, except the host-side media facts (as numpy arrays,
    which the models index like tensors but which need no device)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in HOST_KEYS and isinstance(value, torch.Tensor):
            out[key] = value.numpy()
        elif isinstance(value, torch.Tensor):
            out[key] = mode.from_tensor(value)
        else:
            out[key] = value
    return out


@contextlib.contextmanager
def values_from_host(model: Any, batch: dict[str, Any]) -> Iterator[None]:
    """While a fake step of ``model`` on (the faked) ``batch`` runs: the model's value checks off
    (the real run makes them, or they were proven once) and Idefics3's tile selection given
    the real batch's tiles."""
    inner = _base(model)
    patched = "pixel_values" in batch and hasattr(inner, "connector")
    if patched:
        inner.get_image_features = types.MethodType(_idefics3_features(batch["pixel_values"]), inner)
    saved = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = saved
        if patched:
            del inner.get_image_features


def _base(model: Any) -> Any:
    """The multimodal model under the PEFT wrapper and the head (``...ForConditionalGeneration.model``)."""
    while hasattr(model, "base_model") and model.base_model is not model:
        model = model.base_model
    if hasattr(model, "model") and hasattr(model, "lm_head"):
        model = model.model
    return model


def _idefics3_features(pixel_values: torch.Tensor) -> Any:
    """Idefics3's ``get_image_features`` with the real tiles of ``pixel_values`` found on the host."""
    rows, slots = pixel_values.shape[:2]
    with unset_fake_temporarily():  # the real batch's values, also when called under the fake mode
        real = pixel_values.reshape(rows * slots, -1).ne(0).any(dim=1).numpy()
    keep = torch.from_numpy(np.flatnonzero(real))
    per_row = real.reshape(rows, slots).sum(axis=1).tolist()

    def get_image_features(self: Any, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                           **kwargs: Any) -> Any:
        tiles = pixel_values.to(dtype=self.dtype).flatten(0, 1).index_select(0, keep)
        if pixel_attention_mask is None:
            mask = torch.ones((tiles.size(0), tiles.size(2), tiles.size(3)), dtype=torch.bool)
        else:
            mask = pixel_attention_mask.flatten(0, 1).index_select(0, keep)
        size = self.config.vision_config.patch_size
        patches = mask.unfold(1, size, size).unfold(2, size, size).sum(dim=(-1, -2)) > 0
        kwargs["return_dict"] = True
        out = self.vision_model(pixel_values=tiles, patch_attention_mask=patches, **kwargs)
        features = self.connector(out.last_hidden_state)
        out.pooler_output = [f.reshape(-1, f.shape[-1]) for f in features.split(per_row)]
        return out

    return get_image_features
