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


FLASH_DTYPES = ("torch.float16", "torch.bfloat16")


def flash_problem(dtype: object, capability: tuple[int, int] | None) -> str | None:
    """Why flash-attn cannot run attention in ``dtype`` on a GPU of ``capability`` (None: it can).
    It computes in fp16 / bf16 only, on sm_80 (Ampere) and newer."""
    if str(dtype) not in FLASH_DTYPES:
        return f"flash-attn computes in fp16 / bf16 only (this run: {str(dtype).removeprefix('torch.')})"
    if capability is not None and capability < (8, 0):
        return f"flash-attn needs sm_80 or newer (this GPU: sm_{capability[0]}{capability[1]})"
    return None


def varlen_backend(on_cuda: bool, dtype: object = None, capability: tuple[int, int] | None = None) -> str:
    """The kernel :func:`hpc_train.models.attention.varlen_attention` picks for a packed row in
    ``dtype`` (a ``torch.dtype``) on a GPU of compute ``capability``."""
    if not on_cuda or flash_varlen() is None or flash_problem(dtype, capability) is not None:
        return PER_SAMPLE
    return FLASH_ATTN


def torch_varlen_present() -> bool:
    """PyTorch ships its own varlen attention (``torch.nn.attention.varlen``, CUDA only)."""
    try:
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ModuleNotFoundError:
        return False
