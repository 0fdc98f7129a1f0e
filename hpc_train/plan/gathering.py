"""ZeRO-3's gathered parameters along one step, as DeepSpeed 0.19 fetches, prefetches and
releases them (``runtime/zero/partitioned_param_coordinator.py``).

With more than one rank, ZeRO-3 holds each parameter as a partition and gathers it whole
before a module that owns it runs: at the module's forward and again at its backward. From the
second step on it knows the step's trace (every module's fetch in order, forward and backward)
and, at each module's fetch, prefetches the parameters of the modules that follow, up to
``stage3_prefetch_bucket_size`` elements not yet whole per fetch. Every module fetches, those
owning no parameter too, so the prefetch runs ahead of the modules that use it. A module's
parameters are released after it runs unless the prefetch has passed a later use of them or
the trace uses them again within ``stage3_max_reuse_distance`` elements; parameters of at most
``stage3_param_persistence_threshold`` elements are never released (counted in
:mod:`hpc_train.plan.states`).

So what is whole at a moment depends on the step: a frozen vision tower that runs under no
gradient is released layer by layer behind the prefetch, while a language model whose backward
runs holds its layers from their forward to their backward where that is within the reuse
distance (the shipped configs' 1e9 elements). Not replayed: a module releasing before all its
inputs' gradients are back, one prefetch round per output gradient, parameters a module reads
from another (DeepSpeed's external parameters); each moves a layer's worth at most here. The fake step
(:mod:`hpc_train.plan.fake_step`) records every module's fetch and release in order with the
peak of live bytes between them; :func:`gathered_bytes` replays DeepSpeed's rules over that
trace.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any

from torch import nn

from hpc_train.plan.states import Param


@dataclass(frozen=True)
class Gathering:
    """What ZeRO-3 gathers of a model, and its settings."""

    owned: dict[int, tuple[int, ...]]
    """``id(module)`` -> ids of the parameters it owns directly (every module, none owned too)."""
    stored: dict[int, Param]
    """``id(param)`` -> the parameter as DeepSpeed stores it (bytes when whole)."""
    persistent: frozenset[int]
    """Ids of the parameters kept whole throughout."""
    prefetch: int
    """``stage3_prefetch_bucket_size``: elements a fetch prefetches."""
    max_live: int
    """``stage3_max_live_parameters``: elements whole at once beyond which nothing is prefetched."""
    max_reuse: int
    """``stage3_max_reuse_distance``: elements of later modules within which a reuse keeps a parameter."""


def zero3_gathering(model: nn.Module, stored: dict[int, Param], ds: dict[str, Any], world: int
                    ) -> Gathering | None:
    """The gathering of ``model`` under the resolved DeepSpeed config ``ds`` on ``world`` ranks
    (None when nothing is gathered: ZeRO-2, or one rank holding every parameter whole)."""
    zero = ds.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3 or world == 1:
        return None
    threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
    owned = {id(m): tuple(id(p) for p in m.parameters(recurse=False)) for m in model.modules()}
    return Gathering(owned=owned, stored=stored,
                     persistent=frozenset(k for k, p in stored.items() if p.numel <= threshold),
                     prefetch=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
                     max_live=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
                     max_reuse=int(zero.get("stage3_max_reuse_distance", 1_000_000_000)))


class _Replay:
    """DeepSpeed's parameter coordinator over a complete trace, counting bytes whole."""

    def __init__(self, trace: list[tuple[bool, int]], gathering: Gathering) -> None:
        self.g = gathering
        order = [module for fetch, module in trace if fetch]
        self.queue = [(param, k) for k, module in enumerate(order) for param in gathering.owned[module]]
        numel = [sum(gathering.stored[p].numel for p in gathering.owned[m]) for m in order]
        self.reached = [0, *itertools.accumulate(numel)]  # elements of the modules fetched before each
        self.uses: dict[int, list[int]] = {}
        for k, module in enumerate(order):
            for param in gathering.owned[module]:
                self.uses.setdefault(param, []).append(k)
        self.next, self.step, self.held, self.live = 0, 0, 0, 0
        self.whole: set[int] = set()
        self.passed: dict[int, int] = {}  # param -> the latest use the fetch queue has passed

    def fetch(self, module: int) -> None:
        params = self.g.owned[module]
        for param in params:
            self._gather(param)
        pending = {p for p in params if self.passed.get(p, -1) < self.step}
        popped: set[int] = set()
        while self.next < len(self.queue) and len(popped) < len(pending):
            param, _ = self._pop()
            popped.add(param)
        budget, chosen = min(self.g.max_live - self.live, self.g.prefetch), 0
        while self.next < len(self.queue) and chosen < budget:
            param, _ = self._pop()
            if param not in self.whole and param not in self.g.persistent:
                self._gather(param)
                chosen += self.g.stored[param].numel
        self.step += 1

    def release(self, module: int) -> None:
        for param in self.g.owned[module]:
            if param in self.whole and self.passed.get(param, -1) <= self.step and not self._reused(param):
                self.whole.discard(param)
                self.held -= self._bytes(param)
                self.live -= self.g.stored[param].numel

    def _pop(self) -> tuple[int, int]:
        param, use = self.queue[self.next]
        self.next += 1
        self.passed[param] = max(self.passed.get(param, -1), use)
        return param, use

    def _gather(self, param: int) -> None:
        if param not in self.whole and param not in self.g.persistent:
            self.whole.add(param)
            self.held += self._bytes(param)
            self.live += self.g.stored[param].numel

    def _bytes(self, param: int) -> int:
        return self.g.stored[param].numel * self.g.stored[param].element_size

    def _reused(self, param: int) -> bool:
        """Whether the modules after this step use ``param`` within ``max_reuse`` elements."""
        uses = self.uses[param]
        k = bisect.bisect_left(uses, self.step)
        return k < len(uses) and self.reached[uses[k]] - self.reached[self.step] < self.g.max_reuse


def gathered_bytes(trace: list[tuple[bool, int]], gathering: Gathering) -> list[int]:
    """Bytes gathered whole (persistent ones aside) in each stretch of a step whose ``trace`` is
    its (fetch?, module id) events in order: one value before the first event, one after each."""
    replay = _Replay(trace, gathering)
    out = [0]
    for fetch, module in trace:
        if fetch:
            replay.fetch(module)
        else:
            replay.release(module)
        out.append(replay.held)
    return out


__all__ = ["Gathering", "gathered_bytes", "zero3_gathering"]
