"""PyTorch's ``MemTracker``, narrowed to what a plan needs and fast enough for a real-size model.

``MemTracker`` (``torch.distributed._tools.mem_tracker``) counts every tensor storage by kind
(parameter, buffer, gradient, activation, backward temporary) as operators run, fake tensors
included. Stock, it also snapshots every module's peak at every operator, which for a 256M
model at 2k tokens takes half a minute; the plan needs the step's global peak and the
activations two modules (vision tower, language model) leave behind, so this subclass keeps
only those. Gradients leave their parameter as soon as they are complete, as under DeepSpeed
(which copies them into its own buffers, counted in :mod:`hpc_train.plan.states`). For ZeRO-3's
gathering (:mod:`hpc_train.plan.gathering`) it also records where DeepSpeed's module hooks
would fetch and release parameters, with the peak of live bytes in each stretch between two
such events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._pytree import tree_flatten

TOTAL = "Total"
"""The key ``MemTracker``'s snapshots give the sum of all kinds under."""


class StepTracker(MemTracker):
    """The peak of one training step's live bytes, by kind, with gradients handed off."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_by_kind: dict[str, int] = {}
        self.left_by: dict[str, int] = {}
        """Bytes of activations each watched module's forward left alive."""
        self.trace: list[tuple[bool, int]] = []
        """(fetch?, module id) in the order the step ran them."""
        self.stretch_peaks: list[int] = []
        """Peak live bytes before the first event of :attr:`trace`, then after each (the last
        one once :meth:`end_stretch` closes it)."""
        self._stretch_peak = 0
        self._grad_hooks: list[Any] = []

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

    @contextlib.contextmanager
    def tracing(self, model: nn.Module) -> Iterator[None]:
        """While open: every module's fetches and releases as ZeRO-3's hooks make them, in
        :attr:`trace`. The hooks come last, as DeepSpeed's (added when the engine is made, after
        the model was prepared), so they see outputs as the module's own hooks leave them
        (``enable_input_require_grads`` makes the embeddings' output need a gradient)."""
        handles = []
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(self._before_forward))
            handles.append(module.register_forward_hook(self._after_forward))
        try:
            yield
        finally:
            for handle in [*handles, *self._grad_hooks]:
                handle.remove()
            self._grad_hooks.clear()

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self._event(id(module), fetch=True)
        needing, key = _needing_grad(args), id(module)
        # DeepSpeed releases once every input's gradient from this module has come back; the
        # first one's hook stands for that ("all" would keep the gradients until the last).
        if needing:
            self._grad_hooks.append(torch.autograd.graph.register_multi_grad_hook(
                needing, lambda _: self._event(key, fetch=False), mode="any"))

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._event(id(module), fetch=False)
        needing, key = _needing_grad(output), id(module)
        if needing:  # its backward starts at the first gradient of an output
            self._grad_hooks.append(torch.autograd.graph.register_multi_grad_hook(
                needing, lambda _: self._event(key, fetch=True), mode="any"))

    def _event(self, module: int, fetch: bool) -> None:
        self.end_stretch()
        self.trace.append((fetch, module))

    def end_stretch(self) -> None:
        self.stretch_peaks.append(self._stretch_peak)
        self._stretch_peak = self.live()

    def _left(self, name: str, before: int) -> None:
        self.left_by[name] = self.left_by.get(name, 0) + self.live(_MemRefType.ACT) - before

    def live(self, kind: Any = TOTAL) -> int:
        return sum(snap.get(kind, 0) for snap in self._curr_mem_snap.values())

    @property
    def peak(self) -> int:
        return self.peak_by_kind.get(TOTAL, 0)

    def _update_peak_stats(self, peak_state: Any) -> None:
        live = self.live()
        self._stretch_peak = max(self._stretch_peak, live)
        if live > self.peak:
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


def _needing_grad(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
