"""Which kernel runs packed attention on this machine: one answer for the attention itself and
for ``hpc-train doctor``. No transformers import, so the doctor stays quick."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

FLASH_ATTN = "flash-attn varlen"
PER_SAMPLE = "per-sample SDPA"
"""Exact on any device; one host copy of the sample boundaries per layer."""


@functools.cache
def flash_varlen() -> Callable[..., Any] | None:
    """flash-attn's varlen function, or ``None`` when it is absent or does not load (a wheel
    built for another torch fails here with an undefined symbol)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_backend(on_cuda: bool) -> str:
    """The kernel :func:`hpc_train.models.attention.varlen_attention` picks for a packed row."""
    return FLASH_ATTN if on_cuda and flash_varlen() is not None else PER_SAMPLE


def torch_varlen_present() -> bool:
    """PyTorch ships its own varlen attention (``torch.nn.attention.varlen``, CUDA only)."""
    try:
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ModuleNotFoundError:
        return False
