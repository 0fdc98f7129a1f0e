"""What DeepSpeed keeps per rank beside a step's activations: weights, fp32 master copies,
Adam's moments, gradient partitions and buckets, ZeRO-3's gathered parameters.

The rules are DeepSpeed 0.19's (``runtime/zero/stage_1_and_2.py``, ``stage3.py``,
``partition_parameters.py``), checked byte for byte against live-tensor counts of real
engines on this machine (world sizes 1 and 2, fp32 and bf16); ``benchmarks/plan_accuracy.py``
rechecks them with whole runs. With W ranks and a group's trainable elements padded to a
multiple of 2W, a rank's share is P = padded / W:

ZeRO-2: the trainable weights flattened (all of them, N·b), an fp32 master share (P·4, a copy
even in an fp32 run), Adam's two moments (2·P·4, made at the first step). Backward fills
(1 + overlap_comm) buckets of ``reduce_bucket_size`` elements (model dtype) and, from the
first reduction (mid-backward when the trainable weights outnumber a bucket) to the step, a
gradient store: P·4 with fp32 gradient accumulation in bf16,
else the whole of every parameter that overlaps the rank's share. The step adds a flattened
fp32 gradient (P·4) and unfused AdamW's temporaries: one (P·4) on a GPU, where it runs
``foreach``, two on the CPU, where it runs tensor by tensor (``torch/optim/adamw.py``). Runs
use torch's fused AdamW, which makes none of those temporaries: measured on the CPU (two small
MLPs) its step peaks 1.4–2.0 P·4 lower (ZeRO-3) and 0.4–1.0 lower (ZeRO-2) than this rule,
whose own peak is exact for the unfused step; the rule is kept as the upper bound (the fused
step's own peak moves with the parameters' shapes).

ZeRO-3: every weight as a partition of ceil(n/W) elements, the fp32 master and gradient
partitions, one ``reduce_bucket_size`` bucket in the communication dtype (kept), Adam's
moments, and parameters under ``stage3_param_persistence_threshold`` kept whole after each
step. The parameters gathered whole during a step (W > 1) depend on which modules run
backward: the fake step counts them (:mod:`hpc_train.plan.gathering`).

Offloading the optimizer (``offload_optimizer``) moves master, moments and the gradient
store to host memory; that branch is from reading the code, not measured here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hpc_train.errors import ConfigError
from hpc_train.train.engine import offloads_optimizer, zero_stage


@dataclass(frozen=True)
class Param:
    """One parameter as DeepSpeed stores it."""

    numel: int
    """Elements as stored (a 4-bit weight: its packed elements)."""
    element_size: int
    trainable: bool
    constants: int = 0
    """Bytes kept beside it that are not a parameter (4-bit quantization constants)."""


@dataclass(frozen=True)
class States:
    """Per-rank bytes, by what DeepSpeed holds them for (the worst rank)."""

    stage: int
    weights: int
    """The weights this rank holds between steps (flat, partitioned, frozen, persistent)."""
    quant_constants: int
    master: int
    """fp32 master copy of this rank's trainable share."""
    optimizer: int
    """Adam's moments."""
    gradients: int
    """Gradient store from the reduction to the step (ZeRO-3: kept throughout)."""
    buckets: int
    """Reduce buckets (ZeRO-2: during backward; ZeRO-3: kept)."""
    persistent: int
    """ZeRO-3 parameters under the persistence threshold, kept whole after the first step."""
    step_temporaries: int
    """The optimizer step's own temporaries."""
    largest_gradient: int
    """The largest single gradient (in flight before a bucket takes it)."""
    early_store: bool = False
    """ZeRO-2: the gradient store is there while a backward still holds its activations: kept
    from the previous micro-batch (gradient accumulation), or made by a first reduction that
    comes mid-backward (the trainable weights outnumber a bucket)."""

    @property
    def resident(self) -> int:
        """What the engine holds once built, before the first step."""
        held = self.weights + self.quant_constants + self.master
        return held + self.gradients + self.buckets + self.persistent if self.stage == 3 else held

    def moments(self, step_bytes: int) -> dict[str, int]:
        """Live bytes at the three moments a step can peak, given its own peak (activations and,
        under ZeRO-3, the parameters gathered beside them)."""
        kept = self.weights + self.quant_constants + self.master + self.optimizer
        if self.stage == 3:
            kept += self.gradients + self.buckets + self.persistent  # persistent: whole by the first step
            return {"forward/backward": kept + step_bytes,
                    "optimizer step": kept + self.step_temporaries}
        early = self.gradients if self.early_store else 0
        return {"forward/backward": kept + self.buckets + early + step_bytes,
                "end of backward": kept + self.buckets + self.gradients + self.largest_gradient,
                "optimizer step": kept + self.step_temporaries}


def deepspeed_states(groups: list[list[Param]], frozen: list[Param], ds: dict[str, Any], world: int, *,
                     element_size: int, on_gpu: bool) -> States:
    """The states of the worst rank for trainable parameter ``groups`` (in the optimizer's
    order) and ``frozen`` ones, under the resolved DeepSpeed config ``ds``, on GPUs or CPUs."""
    stage = zero_stage(ds)
    if stage not in (2, 3):
        raise ConfigError(f"ZeRO stage {stage}: hpc-train plan covers stages 2 and 3. Fix: plan with "
                          "deepspeed.config=ds_configs/zero2.json (or zero3.json)")
    zero = ds["zero_optimization"]
    offload = offloads_optimizer(ds)
    bucket = int(zero.get("reduce_bucket_size", 500_000_000))
    trainable = [p for g in groups for p in g]
    largest = max((p.numel * element_size for p in trainable), default=0)
    constants = sum(p.constants for p in [*trainable, *frozen])
    step_copies = 2 if on_gpu else 3  # the flattened fp32 gradient and unfused AdamW's temporaries: an upper bound
    if stage == 2:
        return _zero2(groups, frozen, zero, world, element_size, bucket, offload, constants, largest, step_copies,
                      fp32_accumulation=_fp32_accumulation(ds),
                      accumulates=int(ds.get("gradient_accumulation_steps", 1)) > 1)
    return _zero3(trainable, frozen, zero, world, element_size, bucket, offload, constants, largest, step_copies, ds)


def _fp32_accumulation(ds: dict[str, Any]) -> bool:
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    return bf16 and ds.get("data_types", {}).get("grad_accum_dtype") == "fp32"


def _zero2(groups: list[list[Param]], frozen: list[Param], zero: dict[str, Any], world: int, b: int,
           bucket: int, offload: bool, constants: int, largest: int, step_copies: int, *,
           fp32_accumulation: bool, accumulates: bool) -> States:
    flat = sum(_padded(g, world) for g in groups)
    share = flat // world
    if fp32_accumulation:
        store = share * 4
    else:
        store = max(sum(_overlapping(g, world, r) for g in groups) for r in range(world)) * b
    buckets = (1 + bool(zero.get("overlap_comm", False))) * bucket * b if zero.get("contiguous_gradients", True) else 0
    host = 0 if offload else 1
    return States(stage=2, weights=flat * b + sum(p.numel * p.element_size for p in frozen),
                  quant_constants=constants, master=share * 4 * host, optimizer=2 * share * 4 * host,
                  gradients=store * host, buckets=buckets, persistent=0,
                  step_temporaries=step_copies * share * 4 * host, largest_gradient=largest,
                  early_store=accumulates or sum(p.numel for g in groups for p in g) > bucket)


def _zero3(trainable: list[Param], frozen: list[Param], zero: dict[str, Any], world: int, b: int, bucket: int,
           offload: bool, constants: int, largest: int, step_copies: int, ds: dict[str, Any]) -> States:
    threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
    every = [*trainable, *frozen]
    partitions = sum(math.ceil(p.numel / world) * p.element_size for p in every)
    share = sum(math.ceil(p.numel / world) for p in trainable)
    persistent = sum(p.numel * p.element_size for p in every if p.numel <= threshold)
    comm = 2 if ds.get("communication_data_type") in ("bf16", "fp16") else 4
    accumulate = 4 if ds.get("data_types", {}).get("grad_accum_dtype", "fp32") == "fp32" else b
    host = 0 if offload else 1
    return States(stage=3, weights=partitions, quant_constants=constants, master=share * 4 * host,
                  optimizer=2 * share * 4 * host, gradients=share * accumulate * host, buckets=bucket * comm,
                  persistent=persistent, step_temporaries=step_copies * share * 4 * host,
                  largest_gradient=largest)


def _padded(group: list[Param], world: int) -> int:
    n = sum(p.numel for p in group)
    return math.ceil(n / (2 * world)) * 2 * world


def _overlapping(group: list[Param], world: int, rank: int) -> int:
    """Elements of the group's parameters that overlap ``rank``'s slice of the flat buffer,
    each counted whole (how ZeRO-2 sizes an fp32 run's gradient store)."""
    share = _padded(group, world) // world
    start, end = rank * share, (rank + 1) * share
    total, offset = 0, 0
    for p in group:
        if offset < end and offset + p.numel > start:
            total += p.numel
        offset += p.numel
    return total
