"""A run's plan: peak memory per rank by component, and the step time, before it is queued.

The activations are measured, not estimated: the run's own model (fake tensors, see
:mod:`hpc_train.plan.fake_model`) runs one micro-step on the run's hungriest micro-batch
(:mod:`hpc_train.plan.worst_batch`) under PyTorch's memory tracker — under sequence
parallelism once per rank of a group, each on its slice, over PyTorch's fake process group
(:mod:`hpc_train.plan.fake_world`), the hungriest rank's being the plan; DeepSpeed's states are
counted by its rules (:mod:`hpc_train.plan.states`). A :class:`Planner` builds the model, the
data and the shapes once, so trying other micro-batches, row lengths or frame counts costs
one fake step each.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from hpc_train.config import RunConfig
from hpc_train.data.batching.sequence_shard import shard_batch
from hpc_train.data.caches.vision_cache import VISION_FEATURES
from hpc_train.data.pipeline import build_pipeline
from hpc_train.data.sources.mixture import read_split
from hpc_train.errors import HpcTrainError
from hpc_train.models.cached_vision import takes_cached_vision, use_cached_vision
from hpc_train.models.load import load_processor, model_family
from hpc_train.models.sequence_parallel import (
    check_sequence_parallel,
    media_token_ids,
    use_sequence_parallel,
)
from hpc_train.plan.fake_inputs import uncached_features
from hpc_train.plan.fake_model import fake_training_model, model_config
from hpc_train.plan.fake_step import StepMemory, step_memory
from hpc_train.plan.fake_world import sequence_group
from hpc_train.plan.gathering import zero3_gathering
from hpc_train.plan.gpus import Gpu
from hpc_train.plan.params import deepspeed_params, stored_params
from hpc_train.plan.states import States, deepspeed_states
from hpc_train.plan.worst_batch import PlannedBatch, run_shapes, worst_batch
from hpc_train.train.engine import resolve_ds_config, zero_stage
from hpc_train.train.vision_cache_setup import model_cache_refusal

GIB = 2**30
CONTEXT_GIB = 1.0
"""CUDA context, cuBLAS / NCCL workspaces and communicator buffers: outside PyTorch's
allocated bytes, about 0.5-1 GiB per GPU on current drivers."""
FRAGMENTATION = 0.10
"""What the caching allocator reserves beyond the allocated peak (fragmentation), as a share."""


@dataclass(frozen=True)
class MemoryPlan:
    """One rank's predicted peak: allocated bytes (``torch.cuda.max_memory_allocated``), and
    what the GPU must have for it."""

    states: States
    step: StepMemory
    moments: dict[str, int]
    batch: PlannedBatch

    @property
    def peak(self) -> int:
        return max(self.moments.values())

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=lambda k: self.moments[k])

    @property
    def needs_gib(self) -> float:
        """Allocated peak plus fragmentation plus the CUDA context: compare with the GPU's memory."""
        return self.peak / GIB * (1 + FRAGMENTATION) + CONTEXT_GIB

    def components(self) -> dict[str, int]:
        """The peak by what holds it (bytes; the parts add up to :attr:`peak`)."""
        s, step = self.states, self.step
        parts = {"weights": s.weights + s.persistent, "4-bit constants": s.quant_constants, "fp32 master weights": s.master,
                 "optimizer states": s.optimizer}
        moment = self.peak_moment
        if moment == "forward/backward":
            parts.update({"gradient partitions": s.gradients if s.stage == 3 or s.early_store else 0,
                          "reduce buckets": s.buckets,
                          "gathered ZeRO-3 parameters": step.gathered,
                          "vision activations": step.vision, "language-model activations": step.language_model})
            parts["logits, loss and temporaries"] = step.step_bytes - step.gathered - step.vision - step.language_model
        elif moment == "end of backward":
            parts.update({"gradient partitions": s.gradients, "reduce buckets": s.buckets,
                          "gradient in flight": s.largest_gradient})
        else:
            parts.update({"gradient partitions": s.gradients if s.stage == 3 else 0,
                          "reduce buckets": s.buckets if s.stage == 3 else 0,
                          "optimizer step temporaries": s.step_temporaries})
        return {k: v for k, v in parts.items() if v}


class Planner:
    """What a plan of ``config`` on ``world`` ranks (GPUs, or this machine's CPU) needs, built once."""

    def __init__(self, config: RunConfig, world: int, *, bf16: bool, on_gpu: bool) -> None:
        if config.train.mode == "baseline":
            raise HpcTrainError("train.mode=baseline evaluates only; a plan is for training runs. Fix: plan the "
                                "training config")
        if config.data.train is None:
            raise HpcTrainError("data.train is not set. Fix: pass data.train=PATH")
        self.config, self.world, self.bf16, self.on_gpu = config, world, bf16, on_gpu
        self.family = model_family(config.model)
        self.architecture = model_config(config)
        self.processor = load_processor(config.model)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.records = read_split(config, "train")
        self.mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
        self.model = self._model(config)
        self._shapes: dict[str, Any] = {}

    def changed(self, config: RunConfig) -> Planner:
        """A planner of ``config`` (this one with a training setting changed: mode, checkpointing,
        freezing, DeepSpeed config, sequence parallelism) sharing this one's records, processor
        and measured lengths."""
        other = copy.copy(self)
        other.config = config
        other.model = self._model(config)
        return other

    def _model(self, config: RunConfig) -> torch.nn.Module:
        """The run's fake model; under sequence parallelism split over a group of the fake world
        (:mod:`hpc_train.plan.fake_world`), as each rank's is."""
        model = fake_training_model(config, self.family, self.architecture, self.processor, self.dtype, self.mode)
        if config.data.vision_cache is not None and model_cache_refusal(config, model, self.family) is None:
            use_cached_vision(self.family.inner_model(model), self.family.name)  # as the run's model takes it
        size = config.train.sequence_parallel
        if size > 1:
            check_sequence_parallel(getattr(self.architecture, "text_config", self.architecture), size, self.world)
            use_sequence_parallel(model, self.family.name, sequence_group(self.world, size))
        return model

    @property
    def data_world(self) -> int:
        """Ranks that read different micro-batches (a sequence-parallel group reads one)."""
        return self.world // self.config.train.sequence_parallel

    @property
    def ds(self) -> dict[str, Any]:
        return self._ds(self.config)

    def _ds(self, config: RunConfig) -> dict[str, Any]:
        text = getattr(self.architecture, "text_config", self.architecture)
        return resolve_ds_config(config, self.data_world, bf16=self.bf16, hidden_size=int(text.hidden_size))

    def states(self) -> States:
        ds = self.ds
        size = 2 if self.bf16 else 4
        groups, frozen = deepspeed_params(self.model, self.family, self.config, size, zero_stage(ds))
        return deepspeed_states(groups, frozen, ds, self.world, element_size=size, on_gpu=self.on_gpu)

    def memory(self, config: RunConfig | None = None, indices: list[int] | None = None) -> MemoryPlan:
        """The peak of ``config`` (this one with other batch, length or frame settings), on its
        hungriest micro-batch (or on the records ``indices``)."""
        config = config or self.config
        pipeline = build_pipeline(config.data, self.processor, self.family)
        batch = worst_batch(config, pipeline, self.records, self.lengths(config, pipeline), indices)
        ds = self._ds(config)
        zero, size = zero_stage(ds), 2 if self.bf16 else 4
        stored = stored_params(self.model, self.family, config, size, zero)
        gathering = zero3_gathering(self.model, stored, ds, self.world)
        step = max((step_memory(config, self.family, self.model, part, zero=zero, gathering=gathering)
                    for part in self._rank_batches(config, batch)), key=lambda s: s.step_bytes)
        states = self.states()
        return MemoryPlan(states=states, step=step, moments=states.moments(step.step_bytes), batch=batch)

    def _rank_batches(self, config: RunConfig, batch: PlannedBatch) -> list[dict[str, Any]]:
        """What each rank of a sequence-parallel group trains of ``batch`` (the batch itself
        without it): the plan is the hungriest rank's."""
        size = config.train.sequence_parallel
        if size == 1:
            if takes_cached_vision(self.family.inner_model(self.model)):
                # the first epoch's: every feature row computed (the tower under no gradient)
                tokens = media_token_ids(self.architecture, self.family.name)
                return [{**batch.batch, VISION_FEATURES: uncached_features(batch.batch["input_ids"], tokens)}]
            return [batch.batch]
        tokens = media_token_ids(self.architecture, self.family.name)
        pad = self.processor.tokenizer.pad_token_id
        return [shard_batch(dict(batch.batch), rank=r, size=size, pad_token_id=pad, media_tokens=tokens)
                for r in range(size)]

    def lengths(self, config: RunConfig, pipeline: Any = None) -> list[int]:
        """Every record's token length under ``config``'s media settings (measured once per setting)."""
        key = config.data.video.model_dump_json() + config.data.image.model_dump_json()
        if key not in self._shapes:
            pipeline = pipeline or build_pipeline(config.data, self.processor, self.family)
            self._shapes[key] = run_shapes(config, pipeline, self.records).lengths
        return self._shapes[key]

    def with_settings(self, **changes: Any) -> RunConfig:
        """This config with ``train.micro_batch_size``, ``data.max_seq_len`` or ``data.video.*`` changed."""
        config = self.config
        train = {k: v for k, v in changes.items() if k in ("micro_batch_size",)}
        data = {k: v for k, v in changes.items() if k in ("max_seq_len",)}
        video = {k: v for k, v in changes.items() if k in ("num_frames", "max_frames")}
        new_data = config.data.model_copy(update={**data, "video": config.data.video.model_copy(update=video)})
        return config.model_copy(update={"train": config.train.model_copy(update=train), "data": new_data})


def fits(plan: MemoryPlan, gpu: Gpu) -> bool:
    return plan.needs_gib <= gpu.memory_gib


def largest_that_fits(low: int, high: int, fit: Any) -> int | None:
    """The largest n in [low, high] with ``fit(n)``, assuming fitting is monotone (None if even
    ``low`` does not fit). About log2(high - low) calls."""
    if not fit(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if fit(mid):
            low = mid
        else:
            high = mid - 1
    return low


def frames_key(config: RunConfig) -> str:
    """The setting that bounds frames per video: ``num_frames`` (uniform) or ``max_frames`` (fps)."""
    return "num_frames" if config.data.video.sampling == "uniform" else "max_frames"


__all__ = ["CONTEXT_GIB", "FRAGMENTATION", "MemoryPlan", "Planner", "fits", "frames_key", "largest_that_fits"]
