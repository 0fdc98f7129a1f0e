"""Atomic checkpoints and resume.

A checkpoint is written under ``checkpoints/.tmp/<tag>`` by every rank (DeepSpeed's model,
optimizer and scheduler state, plus each rank's RNG state and the trainer's position), then
renamed to ``checkpoints/<tag>`` by rank 0, and only then is ``checkpoints/latest`` (a text
file naming the tag) replaced. A crash at any point leaves the previous checkpoint and the
``latest`` pointer intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpc_train.dist import DistInfo, barrier

LATEST = "latest"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    micro_index: int = 0
    """Next micro-batch of ``epoch`` on this rank."""
    bad_steps: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    world_size: int = 1


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


class Checkpointer:
    """Saves and restores checkpoints under ``root`` (shared by all ranks)."""

    def __init__(self, root: str | Path, info: DistInfo, *, keep: int = 2) -> None:
        self.root = Path(root)
        self.info = info
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, engine: Any, state: TrainState) -> Path:
        """Collective: every rank must call it at the same step."""
        tag = tag_for(state.step)
        staging = self.root / ".tmp"
        if self.info.is_main:
            shutil.rmtree(staging / tag, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
        barrier()
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
        torch.save(_rng_state(), staging / tag / f"rng_rank{self.info.rank}.pt")
        barrier()
        final = self.root / tag
        if self.info.is_main:
            (staging / tag / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging / tag, final)
            _write_atomic(self.root / LATEST, tag)
            self._prune()
        barrier()
        return final

    def load(self, engine: Any, path: Path) -> TrainState:
        """Restore model, optimizer, scheduler and RNG; return the trainer's position."""
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
        rng = path / f"rng_rank{self.info.rank}.pt"
        if rng.is_file() and state.world_size == self.info.world_size:
            _set_rng_state(torch.load(rng, weights_only=False))
        return state

    def _prune(self) -> None:
        tags = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in tags[: max(len(tags) - self.keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
