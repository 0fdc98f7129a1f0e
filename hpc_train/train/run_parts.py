"""The parts of one training (or evaluation-only) run, as the build step returns them.

:func:`hpc_train.train.build.build_run` makes a :class:`RunParts`; the loop
(:mod:`hpc_train.train.trainer`) and the run's outputs (:mod:`hpc_train.train.run_outputs`)
only read them. Every field is declared here, so what a run is made of reads in one place.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpc_train.config import RunConfig
from hpc_train.data.batching.collate import Collator
from hpc_train.data.batching.packing import PackedCollator, PlannedPacks
from hpc_train.data.dataset import SampleDataset
from hpc_train.data.deferred_videos import DeviceVideos
from hpc_train.data.pipeline import DataPipeline
from hpc_train.data.sources.records import Record
from hpc_train.dist import DistInfo
from hpc_train.models.families import Family
from hpc_train.slurm_outcome import REQUEUE_EXIT_CODE, REQUEUE_MARKER
from hpc_train.train.checkpoint import Checkpointer, TrainState
from hpc_train.train.data_order import PlannedBatches
from hpc_train.train.engine import zero_stage
from hpc_train.train.loss import LossFn
from hpc_train.train.metrics import MetricsLogger
from hpc_train.train.step_timer import StepTimer
from hpc_train.train.trainable_model import LoadedModel
from profiling.profiler import Profiler

# REQUEUE_EXIT_CODE: exit status after a signal-triggered checkpoint (EX_TEMPFAIL); REQUEUE_MARKER:
# written to ``output_dir`` by rank 0 next to that exit, removed when the run starts again. Both
# live where the batch shell's requeue decision reads them without importing the training code.
REQUEUE_DIR_ENV = "HPC_TRAIN_REQUEUE_DIR"
"""A folder (set by ``launch/torchrun.sh``) where each rank that stopped for a requeue leaves a
file: torchrun reports such workers as failed, and the script exits 75 when all of them did."""
COMPLETE_MARKER = "run_complete.json"
"""Written when a training run has trained, exported and evaluated: the same command again then
does nothing (and says so) instead of rewriting its outputs."""


def note_requeue_stop(rank: int) -> None:
    """Tell the node's launcher (``$HPC_TRAIN_REQUEUE_DIR``, when it set one) that this rank
    stopped for a requeue."""
    folder = os.environ.get(REQUEUE_DIR_ENV)
    if folder:
        with contextlib.suppress(OSError):  # the launcher then reports torchrun's status instead
            (Path(folder) / f"rank{rank}").write_text(str(REQUEUE_EXIT_CODE))


@dataclass
class TrainData:
    """The training samples, the order the loop reads them in, and the exact step count."""

    dataset: SampleDataset
    batches: PlannedBatches | PlannedPacks
    """This rank's batch sampler; the loop sets its ``position`` before each pass."""
    collate: Collator | PackedCollator
    total_steps: int
    packing_efficiency: float | None = None
    """The first epoch's plan (packing only): real tokens / slots."""
    finish: DeviceVideos | None = None
    """Decodes the videos the workers left to the training process (``data.video.device=cuda``)."""


@dataclass
class EvalData:
    """``data.eval`` (cut to ``eval.max_samples``) and its samples."""

    records: list[Record]
    dataset: SampleDataset


@dataclass
class TrainingEngine:
    """DeepSpeed's engine and what lives beside it for a training run."""

    engine: Any
    """``deepspeed.DeepSpeedEngine``: forward, backward, step, checkpoints."""
    optimizer: Any
    checkpointer: Checkpointer
    state: TrainState
    metrics: MetricsLogger
    first_step: int
    """The step this process trains first: 1, or the one after a resumed checkpoint."""


@dataclass
class RunParts:
    """Everything a run is made of, built once before its first step."""

    config: RunConfig
    info: DistInfo
    device: torch.device
    loaded: LoadedModel
    ds: dict[str, Any] | None
    """The resolved DeepSpeed config (None for an evaluation without ZeRO-3)."""
    pipeline: DataPipeline
    loss: LossFn
    timer: StepTimer
    profiler: Profiler | None
    train: TrainData | None
    """None for an evaluation-only run."""
    eval: EvalData | None
    """None without ``data.eval``."""
    training: TrainingEngine | None
    eval_model: Any
    """What evaluation runs: the engine when training, DeepSpeed's ZeRO-3 wrapper, or the model."""
    attention: str
    """The kernel packed rows use (:data:`~hpc_train.models.varlen_backend.BACKENDS`)."""
    evaluation: dict[str, Any] | None = None
    """What the evaluation measured, for the profiling report (rank 0, once it has run)."""

    @property
    def output(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def family(self) -> Family:
        return self.loaded.family

    @property
    def zero_stage(self) -> int | None:
        return zero_stage(self.ds) if self.ds is not None else None

    @property
    def step(self) -> int:
        """Optimizer steps done (0 for an evaluation-only run)."""
        return self.training.state.step if self.training is not None else 0

    def say(self, text: str) -> None:
        """Print on rank 0 only."""
        if self.info.is_main:
            print(text, flush=True)


__all__ = ["COMPLETE_MARKER", "REQUEUE_DIR_ENV", "REQUEUE_EXIT_CODE", "REQUEUE_MARKER", "EvalData", "RunParts",
           "TrainData", "TrainingEngine", "note_requeue_stop"]
