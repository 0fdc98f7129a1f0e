"""The varlen attention for packed rows, registered with transformers' attention interface.

A packed row carries ``cu_seq_lens_q`` (sample boundaries); attention then runs per sample,
with the kernel chosen once per run (:func:`~hpc_train.models.varlen_backend.varlen_backend`):
flash-attn's varlen kernel, PyTorch's own (``torch.nn.attention.varlen``), or an exact causal
SDPA per sample whose boundaries the collator read on the host (``sample_bounds``), so no
layer waits for the device. Without ``cu_seq_lens_q`` (a padded batch, generation) it is
transformers' SDPA. Only the language model uses it; vision towers keep their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hpc_train.models.host_masks import base_name, register_with_masks
from hpc_train.models.varlen_backend import FLASH_ATTN, PER_SAMPLE, TORCH_VARLEN, flash_varlen

VARLEN = "hpc_varlen"
"""The per-sample implementation's name; each kernel has its own (:data:`IMPLEMENTATIONS`)."""
IMPLEMENTATIONS = {PER_SAMPLE: VARLEN, TORCH_VARLEN: "hpc_varlen_torch", FLASH_ATTN: "hpc_varlen_flash"}

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float | None, dict[str, Any]],
                  torch.Tensor]
"""``kernel(query, key, value, cu_seqlens, dropout, scaling, kwargs)``: (batch 1, heads, seq,
dim) in; (1, seq, heads, dim) out."""


def _per_sample(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
                dropout: float, scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
    bounds = kwargs.get("sample_bounds")
    if bounds is None:  # a row packed by hand, without the collator's host copy: read it here
        bounds = cu.tolist()
    groups = query.shape[1] // key.shape[1]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        k, v = key[:, :, start:end], value[:, :, start:end]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        pieces.append(F.scaled_dot_product_attention(query[:, :, start:end], k, v, dropout_p=dropout,
                                                     scale=scaling, is_causal=True))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous()


def _torch_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
                  dropout: float, scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if dropout:
        raise ValueError("PyTorch's varlen attention has no dropout; the run should have chosen another kernel")
    out = varlen_attn(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, cu,
                      kwargs["max_length_q"], kwargs["max_length_k"], scale=scaling, window_size=(-1, 0),
                      enable_gqa=query.shape[1] != key.shape[1])
    return out[None]


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
           dropout: float, scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
    flash = flash_varlen()
    if flash is None:
        raise ValueError("flash-attn does not load here; the run should have chosen another kernel")
    out = flash(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=kwargs["max_length_q"],
                max_seqlen_k=kwargs["max_length_k"], dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out[None]


KERNELS: dict[str, Kernel] = {PER_SAMPLE: _per_sample, TORCH_VARLEN: _torch_varlen, FLASH_ATTN: _flash}


def attention_with(kernel: Kernel) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function for transformers' interface: ``kernel`` for packed rows, SDPA otherwise."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        if key.shape[2] != query.shape[2]:
            # transformers builds a KV cache when use_cache is on (even in training), which would
            # prepend past keys to a packed row and make every boundary wrong.
            raise ValueError("a packed row cannot be run with a KV cache: call the model with use_cache=False")
        if query.shape[0] != 1:
            raise ValueError("a packed batch must be one row (batch size 1); got "
                             f"{query.shape[0]} rows with cu_seq_lens")
        return kernel(query, key, value, cu, dropout if module.training else 0.0, scaling, kwargs), None

    return attention


varlen_attention = attention_with(_per_sample)
"""The exact per-sample attention (any device)."""


def register_varlen_attention() -> None:
    """Make each kernel's ``attn_implementation`` known to transformers, with the names
    :mod:`hpc_train.models.host_masks` swaps in (idempotent)."""
    for backend, name in IMPLEMENTATIONS.items():
        register_with_masks(name, attention_with(KERNELS[backend]))


def use_varlen_attention(model: torch.nn.Module, backend: str = PER_SAMPLE) -> None:
    """Switch the language model (not the vision tower) to our attention with ``backend``'s
    kernel for packed rows (a :data:`~hpc_train.models.varlen_backend.BACKENDS` name)."""
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"unknown varlen backend {backend!r}; one of {sorted(IMPLEMENTATIONS)}")
    register_varlen_attention()
    text = getattr(model.config, "text_config", None)
    if text is None:
        raise ValueError("the model has no text_config; packing supports vision-language models only")
    text._attn_implementation = IMPLEMENTATIONS[backend]


def uses_varlen_attention(model: torch.nn.Module) -> bool:
    text = getattr(model.config, "text_config", None)
    return base_name(getattr(text, "_attn_implementation", None)) in IMPLEMENTATIONS.values()
