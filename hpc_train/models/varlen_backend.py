"""Which kernel runs packed attention on this machine: one answer for the attention itself and
for ``hpc-train doctor``. No transformers import, so the doctor stays quick."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

FLASH_ATTN = "flash-attn varlen"
TORCH_VARLEN = "torch varlen"
"""PyTorch's own varlen attention (FlashAttention kernels inside torch; CUDA, fp16 / bf16, no dropout)."""
PER_SAMPLE = "per-sample SDPA"
"""Exact on any device: causal SDPA per sample, the boundaries read on the host by the collator."""
BACKENDS = (FLASH_ATTN, TORCH_VARLEN, PER_SAMPLE)


@functools.cache
def flash_varlen() -> Callable[..., Any] | None:
    """flash-attn's varlen function, or ``None`` when it is absent or does not load (a wheel
    built for another torch fails here with an undefined symbol)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


FLASH_DTYPES = ("torch.float16", "torch.bfloat16")


def flash_problem(dtype: object, capability: tuple[int, int] | None) -> str | None:
    """Why a FlashAttention kernel (flash-attn's or PyTorch's) cannot run attention in ``dtype``
    on a GPU of ``capability`` (None: it can). It computes in fp16 / bf16 only, on sm_80
    (Ampere) and newer."""
    if str(dtype) not in FLASH_DTYPES:
        return f"FlashAttention computes in fp16 / bf16 only (this run: {str(dtype).removeprefix('torch.')})"
    if capability is not None and capability < (8, 0):
        return f"FlashAttention needs sm_80 or newer (this GPU: sm_{capability[0]}{capability[1]})"
    return None


def varlen_backend(on_cuda: bool, dtype: object = None, capability: tuple[int, int] | None = None,
                   dropout: float = 0.0) -> str:
    """The kernel packed rows use in ``dtype`` (a ``torch.dtype``) on a GPU of compute
    ``capability``, with attention ``dropout``: flash-attn's when it loads, else PyTorch's own
    (which has no dropout), else the exact per-sample path. Chosen once per run."""
    if not on_cuda or flash_problem(dtype, capability) is not None:
        return PER_SAMPLE
    if flash_varlen() is not None:
        return FLASH_ATTN
    if torch_varlen_present() and dropout == 0.0:
        return TORCH_VARLEN
    return PER_SAMPLE


def torch_varlen_present() -> bool:
    """PyTorch ships its own varlen attention (``torch.nn.attention.varlen``, CUDA only)."""
    try:
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ModuleNotFoundError:
        return False
