"""Attention masks the host decides on, so transformers need not read the device to decide.

transformers, before each forward of the language model, finds out on the device whether a
mask is needed (packed-sequence detection in ``position_ids``, ``padding_mask.all()``): a
device read every forward. Our collators know the answer on the host and say it by what they
leave out: no ``attention_mask`` (packed rows, a batch without padding), no
``pixel_attention_mask`` (no padded image tile). For one forward (:func:`masks_decided_on_host`)
the attention then runs under a name whose mask function does not ask the device:

- ``<name>_unmasked``: no mask function, so transformers builds no mask at all (a packed row's
  kernel finds its samples in ``cu_seq_lens``; a row without padding is plain causal);
- ``<name>_padded``: the padding mask built without transformers' check of its values.

Every other call (generation, a user's own forward) keeps ``<name>``, whose mask function is
transformers' own except that a packed row gets no (1, 1, T, T) boundary mask nobody reads.
A backward that recomputes layers (gradient checkpointing) finds the same attention function
under every name.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

UNMASKED_SUFFIX, PADDED_SUFFIX = "_unmasked", "_padded"
VISION_UNMASKED = "hpc_vision_unmasked"
"""transformers' SDPA attention for a vision tower, with no mask function."""
_OURS: set[str] = set()


def mask_unless_causal_is_exact(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                                kv_offset: int = 0, attention_mask: torch.Tensor | None = None,
                                **kwargs: Any) -> torch.Tensor | None:
    """transformers' SDPA mask, except none for whole rows without padding and without a local
    window: a packed row (transformers sees the packing in ``position_ids`` and would build a
    (1, 1, T, T) mask of the sample boundaries, 256 MiB at 16k tokens, that our kernels never
    read) or a full causal row (SDPA's causal flag serves it exactly)."""
    whole_rows = q_offset == 0 and kv_offset == 0 and q_length == kv_length
    if attention_mask is None and whole_rows and kwargs.get("local_size") is None:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, **kwargs)


def padded_mask(batch_size: int, q_length: int, kv_length: int, **kwargs: Any) -> torch.Tensor | None:
    """The SDPA mask of a batch the collator found padding in: built without transformers'
    device check of whether it could be skipped."""
    return sdpa_mask(batch_size, q_length, kv_length, **{**kwargs, "allow_is_causal_skip": False})


def register_with_masks(name: str, attention: Callable[..., Any]) -> None:
    """Register ``attention`` under ``name`` and its unmasked / padded variants."""
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask_unless_causal_is_exact)
    AttentionInterface.register(name + UNMASKED_SUFFIX, attention)
    AttentionInterface.register(name + PADDED_SUFFIX, attention)
    AttentionMaskInterface.register(name + PADDED_SUFFIX, padded_mask)
    _OURS.add(name)
    _vision_registered()


def base_name(name: str | None) -> str | None:
    """The registered name a variant belongs to."""
    for suffix in (UNMASKED_SUFFIX, PADDED_SUFFIX):
        if name and name.endswith(suffix) and name.removesuffix(suffix) in _OURS:
            return name.removesuffix(suffix)
    return name


@functools.cache
def _vision_registered() -> None:
    AttentionInterface.register(VISION_UNMASKED, sdpa_attention_forward)


def _full_attention_only(text: Any) -> bool:
    """No layer with a local window (a Qwen2 with ``use_sliding_window``): its window needs a mask."""
    return all(kind == "full_attention" for kind in getattr(text, "layer_types", None) or ["full_attention"])


@contextlib.contextmanager
def masks_decided_on_host(model: Any, inputs: dict[str, Any]) -> Iterator[None]:
    """One forward of a batch collated by us, under the names that match what it leaves out
    (see the module's text); the model's own names are back afterwards, also on an error."""
    _vision_registered()
    config = getattr(getattr(model, "module", model), "config", None)
    text, vision = getattr(config, "text_config", None), getattr(config, "vision_config", None)
    swaps = []
    if text is not None and text._attn_implementation in _OURS:
        if "attention_mask" in inputs:
            swaps.append((text, text._attn_implementation + PADDED_SUFFIX))
        elif _full_attention_only(text):
            swaps.append((text, text._attn_implementation + UNMASKED_SUFFIX))
    if vision is not None and "pixel_attention_mask" not in inputs and vision._attn_implementation == "sdpa":
        swaps.append((vision, VISION_UNMASKED))
    saved = [(sub, sub._attn_implementation) for sub, _ in swaps]
    try:
        for sub, name in swaps:
            sub._attn_implementation = name
        yield
    finally:
        for sub, name in saved:
            sub._attn_implementation = name


__all__ = ["PADDED_SUFFIX", "UNMASKED_SUFFIX", "VISION_UNMASKED", "base_name", "mask_unless_causal_is_exact",
           "masks_decided_on_host", "padded_mask", "register_with_masks"]
