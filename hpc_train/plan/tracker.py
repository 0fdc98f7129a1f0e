"""PyTorch's ``MemTracker``, narrowed to what a plan needs and fast enough for a real-size model.

``MemTracker`` (``torch.distributed._tools.mem_tracker``) counts every tensor storage by kind
(parameter, buffer, gradient, activation, backward temporary) as operators run, fake tensors
included. Stock, it also snapshots every module's peak at every operator, which for a 256M
model at 2k tokens takes half a minute; the plan needs the step's global peak and the
activations two modules (vision tower, language model) leave behind, so this subclass keeps
only those. Gradients leave their parameter as soon as they are complete, as under DeepSpeed
(which copies them into its own buffers, counted in :mod:`hpc_train.plan.states`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

TOTAL = "Total"
"""The key ``MemTracker``'s snapshots give the sum of all kinds under."""


class StepTracker(MemTracker):
    """The peak of one training step's live bytes, by kind, with gradients handed off."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_by_kind: dict[str, int] = {}
        self.left_by: dict[str, int] = {}
        """Bytes of activations each watched module's forward left alive."""

    @contextlib.contextmanager
    def watching(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """While open: the activations each module's forward leaves for backward, as ``left_by[name]``."""
        handles = []
        for name, module in modules.items():
            before: list[int] = []
            handles.append(module.register_forward_pre_hook(
                lambda *_, before=before: before.append(self.live(_MemRefType.ACT))))
            handles.append(module.register_forward_hook(
                lambda *_, name=name, before=before: self._left(name, before.pop())))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _left(self, name: str, before: int) -> None:
        self.left_by[name] = self.left_by.get(name, 0) + self.live(_MemRefType.ACT) - before

    def live(self, kind: Any = TOTAL) -> int:
        return sum(snap.get(kind, 0) for snap in self._curr_mem_snap.values())

    @property
    def peak(self) -> int:
        return self.peak_by_kind.get(TOTAL, 0)

    def _update_peak_stats(self, peak_state: Any) -> None:
        if self.live() > self.peak:
            merged: dict[str, int] = {}
            for snap in self._curr_mem_snap.values():
                for kind, size in snap.items():
                    name = str(getattr(kind, "value", kind))  # "Parameter", "Activation", ... and "Total"
                    merged[name] = merged.get(name, 0) + size
            self.peak_by_kind = merged

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True
                                         ) -> tuple[int, int]:
        params = sum(self._count(p, _MemRefType.PARAM) for p in module.parameters())
        buffers = sum(self._count(b, _MemRefType.BUFFER) for b in module.buffers())
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_post_accumulate_grad_hook(self._hand_off),)
        return params, buffers

    def _count(self, tensor: torch.Tensor, kind: Any) -> int:
        return sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(tensor, kind))

    def _hand_off(self, param: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
        self._update_peak_stats(None)
        param.grad = None

    def _deregister_param_and_optimizer_hooks(self) -> None:
        for handles in self._param_to_grad_hook_handles.values():
            for handle in handles:
                handle.remove()
        self._param_to_grad_hook_handles.clear()
        if self._optimizer_hook_handles is not None:
            for handle in self._optimizer_hook_handles:
                handle.remove()
            self._optimizer_hook_handles = None
