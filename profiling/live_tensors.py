"""Bytes of live tensor storage on a device, counted as a real run allocates and frees it.

On a GPU, PyTorch's caching allocator counts this (``torch.cuda.max_memory_allocated``); on a
CPU nothing does. :class:`LiveTensorBytes` is a dispatch mode that sees every tensor an
operator returns (factories, DeepSpeed's flat buffers, optimizer states and gradients
included), keeps each distinct storage once with its size and drops it when the storage is
freed; the peak of their sum is the CPU counterpart of the GPU's peak allocated bytes.
Storages made before the mode starts are counted when given to :meth:`adopt` (a loaded model).

It is the *measured* side that ``hpc-train plan``'s predictions are checked against, so it
shares nothing with the planner (which runs PyTorch's ``MemTracker`` on fake tensors).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Live storage bytes on ``device_type`` while active: ``current``, ``peak`` (and ``mark``
    for the peak of a stretch of the run)."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_since_mark = 0

    def mark(self) -> None:
        """Start a new stretch: ``peak_since_mark`` restarts from what is live now."""
        self.peak_since_mark = self.current

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made before the mode started (a model's parameters and buffers)."""
        for tensor in tensors:
            self._see(tensor)

    def _see(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type or tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        size = storage.nbytes()
        known = self._sizes.get(key)
        if known is None:
            self._sizes[key] = size
            weakref.finalize(storage, self._freed, key)
            self._add(size)
        elif size != known:  # resized in place (ZeRO-3 frees a gathered parameter so)
            self._sizes[key] = size
            self._add(size - known)

    def _freed(self, key: int) -> None:
        self._add(-self._sizes.pop(key, 0))

    def _add(self, delta: int) -> None:
        self.current += delta
        if self.current > self.peak:
            self.peak = self.current
        if self.current > self.peak_since_mark:
            self.peak_since_mark = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Inputs too: an in-place resize shows up on the tensor it was given.
        for value in tree_flatten((out, args))[0]:
            if isinstance(value, torch.Tensor):
                self._see(value)
        return out
