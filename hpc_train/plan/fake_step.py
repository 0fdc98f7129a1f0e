"""One training micro-step of the run's model on a real batch, in fake tensors: the bytes it
keeps alive at its peak, by kind, without allocating any of them (the model: from
:func:`hpc_train.plan.fake_model.fake_training_model`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from hpc_train.config import RunConfig
from hpc_train.data.batching.collate import step_inputs
from hpc_train.models.families import Family
from hpc_train.plan.fake_inputs import fake_batch, values_from_host
from hpc_train.plan.gathering import Gathering, gathered_bytes
from hpc_train.plan.tracker import StepTracker
from hpc_train.train.loss import loss_for


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one micro-step at its peak (forward, loss, backward)."""

    peak: int
    """Everything alive at once at the step's peak, weights as built here included (under
    ZeRO-3: the largest of a stretch's live bytes plus the parameters whole in it)."""
    weights: int
    """Parameters and buffers of the fake model (dense: QLoRA's 4-bit storage is not here)."""
    vision: int
    """Activations the vision tower's (and connector's) forward left for backward."""
    language_model: int
    """Activations the language model's layers left for backward (its inputs included)."""
    gathered: int = 0
    """ZeRO-3 parameters gathered whole at the peak (in :attr:`peak`)."""

    @property
    def step_bytes(self) -> int:
        """What the step adds on top of the weights."""
        return self.peak - self.weights


def step_memory(config: RunConfig, family: Family, model: torch.nn.Module, batch: dict[str, Any], *,
                zero: int, gathering: Gathering | None = None) -> StepMemory:
    """The memory of one micro-step of the run's fake model (:func:`fake_training_model`) on
    ``batch`` (a collated batch, real CPU tensors) under ZeRO stage ``zero`` (its head tiled or
    not), with ZeRO-3's ``gathering`` of parameters along the way when there is one."""
    mode = _fake_mode_of(model)
    inputs = step_inputs(batch)
    fake = fake_batch(inputs, mode)
    tracker = StepTracker()
    tracing = tracker.tracing(model) if gathering is not None else contextlib.nullcontext()
    with tracker.watching(_watched_modules(model, family)), tracing, values_from_host(model, inputs), mode, tracker:
        tracker.track_external(model)
        loss = loss_for(config.data, config.train, zero=zero)(model, fake)
        if loss.value.requires_grad:
            loss.value.backward()
    kinds = tracker.peak_by_kind
    peak, gathered = tracker.peak, 0
    if gathering is not None:
        tracker.end_stretch()
        peak, gathered = max((live + whole, whole) for live, whole in
                             zip(tracker.stretch_peaks, gathered_bytes(tracker.trace, gathering), strict=True))
    return StepMemory(peak=peak, weights=kinds.get("Parameter", 0) + kinds.get("Buffer", 0),
                      vision=tracker.left_by.get("vision", 0), language_model=tracker.left_by.get("llm", 0),
                      gathered=gathered)


def _fake_mode_of(model: torch.nn.Module) -> FakeTensorMode:
    param = next(model.parameters())
    if not isinstance(param, FakeTensor):
        raise TypeError("step_memory needs the fake model of fake_training_model")
    return param.fake_mode


def _watched_modules(model: Any, family: Family) -> dict[str, torch.nn.Module]:
    """The vision tower and the language model, as the family finds them (also under PEFT)."""
    inner = family.inner_model(model)
    return {"vision": getattr(inner, family.vision_model), "llm": getattr(inner, family.language_model)}
