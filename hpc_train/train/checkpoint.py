"""Checkpoints that survive every crash, and the resume that trusts only verified ones.

A checkpoint is written under ``checkpoints/.tmp/<tag>`` by every rank (DeepSpeed's model,
optimizer and scheduler state, each rank's RNG state, the trainer's position), its manifest
(every file's size and SHA-256, :mod:`hpc_train.train.manifest`) is written last, and only then
is it renamed to ``checkpoints/<tag>`` and ``checkpoints/latest`` pointed at it. A checkpoint is
never replaced in place: saving the step that was just saved (or loaded) does nothing, and a
folder of the same name from an earlier run is moved aside before the new one is renamed in.

A resume verifies the newest checkpoint against its manifest and falls back to the newest one
that verifies, saying which it skipped and why. Checkpoints that exist but none verify stop the
run with their names, never a silent start from step 0; ``train.resume=false`` starts over and
keeps the old checkpoints in ``checkpoints.before-<time>/``. Every file is read back as data
(:mod:`hpc_train.safe_load`): one that would run code fails its checkpoint like a
corrupted file. A checkpoint folder can hold data, never code.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpc_train.dist import DistInfo, barrier
from hpc_train.errors import HpcTrainError
from hpc_train.safe_load import CodeInFile, load_data, weights_only_loads
from hpc_train.train.manifest import MANIFEST, problems, write_manifest
from hpc_train.train.module_restore import restore_module
from hpc_train.train.output_dir import (
    OutputError,
    agreed,
    is_write_failure,
    room_problem,
    write_failure,
)

LATEST = "latest"
STATE_FILE = "trainer_state.json"
STAGING = ".tmp"
TAG = re.compile(r"step-\d{8}")


class CheckpointError(HpcTrainError):
    """No checkpoint can be resumed from, or one cannot be loaded."""


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
    """Saves and restores checkpoints under ``root`` (shared by all ranks). Every method is
    collective: all ranks call it at the same point."""

    def __init__(self, root: str | Path, info: DistInfo, *, keep: int = 2, expected_bytes: int = 0) -> None:
        self.root = Path(root)
        self.info = info
        self.keep = keep
        self.saved_step: int | None = None
        """The step whose checkpoint is on disk and current (saved or loaded by this run)."""
        self.expected_bytes = expected_bytes
        """Room the next checkpoint needs: an estimate until one is saved, then that one's size."""
        self.lead_warned = False

    def prepare(self, *, resume: bool) -> list[str]:
        """Before anything is saved or loaded: drop half-written saves; when not resuming, move an
        earlier run's checkpoints aside. Returns what was done, to be said."""
        said = []
        if self.info.is_main:
            shutil.rmtree(self.root / STAGING, ignore_errors=True)
            if not resume and self.tags():
                aside = self.root.with_name(f"{self.root.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.root, aside)
                said.append(f"train.resume=false: the earlier checkpoints were moved to {aside}")
        barrier()
        return said

    def tags(self) -> list[str]:
        """Checkpoint folders, newest first."""
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if TAG.fullmatch(p.name) and p.is_dir()), reverse=True)

    def complete_tags(self) -> list[str]:
        """Checkpoint folders whose manifest was written (the save finished), newest first."""
        return [t for t in self.tags() if (self.root / t / MANIFEST).is_file()]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, for messages."""
        done = self.complete_tags()
        return self.root / done[0] if done else None

    def resume_point(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that verifies, and notes on what was skipped and why; ``None``
        when there is no checkpoint at all."""
        tags = _from_main(self.tags())
        notes = _from_main(self._pointer_notes(tags))
        for tag in tags:
            bad = problems(self.root / tag)
            if not bad:
                return self.root / tag, notes
            notes.append(f"{tag} skipped: {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
        if tags or (self.root / LATEST).exists():
            raise CheckpointError(
                f"{self.root}: no checkpoint can be resumed from ({'; '.join(notes)}). Fix: restore or remove "
                "the broken checkpoints, or start over with train.resume=false (the old ones are then kept "
                f"in {self.root.name}.before-<time>/)")
        return None, notes

    def _pointer_notes(self, tags: list[str]) -> list[str]:
        pointer = self.root / LATEST
        if not pointer.exists():
            return [f"{LATEST} is missing"] if tags else []
        try:
            named = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return [f"{LATEST} cannot be read"]
        if not named:
            return [f"{LATEST} is empty"]
        if named not in tags:
            return [f"{LATEST} names {named!r}, which is not there"]
        if named != tags[0]:
            return [f"{LATEST} names {named}, but {tags[0]} is newer (the run stopped before updating {LATEST})"]
        return []

    def save(self, engine: Any, state: TrainState) -> Path:
        """Write a checkpoint of ``state`` (nothing when this step's is already on disk). A disk
        without room for it stops every rank before anything is written; a write that fails
        anyway stops every rank with one :class:`OutputError` naming the path and a fix, and the
        partial copy removed."""
        tag = tag_for(state.step)
        final = self.root / tag
        if self.saved_step == state.step:
            return final
        problem = agreed(room_problem(self.root, self.expected_bytes, f"checkpoint {tag}"))
        if problem:
            raise OutputError(f"{problem} (the newest complete checkpoint, {self.latest()}, is intact)")
        started = time.perf_counter()
        staging = self.root / STAGING / tag
        failure = self._write(engine, state, staging, final)
        if failure:
            if self.info.is_main:
                shutil.rmtree(staging, ignore_errors=True)  # a partial copy must not keep the disk full
            barrier()
            raise OutputError(f"{failure} (checkpoint {tag} not saved, its partial copy removed; the newest "
                              f"complete checkpoint is {self.latest()})")
        size = 0
        if self.info.is_main:
            size = _folder_bytes(final)
            took = time.perf_counter() - started
            print(f"saved checkpoint {final} (step {state.step}, {size / 2**20:.1f} MiB, {took:.1f} s)", flush=True)
            warning = None if self.lead_warned else lead_warning(took)
            if warning:
                print(warning, flush=True)
                self.lead_warned = True
        self.expected_bytes = _from_main(size)
        self.saved_step = state.step
        return final

    def _write(self, engine: Any, state: TrainState, staging: Path, final: Path) -> str | None:
        """Stage, verify and publish a checkpoint; the first write failure (the same on every
        rank), or None. Each stage ends with the ranks agreeing, so none waits in a collective
        another rank has left."""
        def prepare() -> None:
            if self.info.is_main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.parent.mkdir(parents=True, exist_ok=True)

        def own_files() -> None:
            torch.save(_rng_state(), staging / f"rng_rank{self.info.rank}.pt")
            if self.info.is_main:
                (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))

        def publish() -> None:
            if self.info.is_main:
                self._publish(staging, final)

        failure = agreed(_attempt(staging, prepare))
        if failure is None:
            # DeepSpeed's writes come after its collectives but its closing barrier: a rank whose
            # write fails joins that barrier itself, so the others are not left waiting in it.
            failure = _attempt(staging, lambda: engine.save_checkpoint(str(staging.parent), tag=staging.name,
                                                                        save_latest=False), on_failure=barrier)
            failure = agreed(failure or _attempt(staging, own_files))
        for stage in (lambda: write_manifest(staging, step=state.step, world_size=self.info.world_size,
                                             main=self.info.is_main), publish):
            if failure is None:
                failure = agreed(_attempt(staging, stage))
        return failure

    def _publish(self, staging: Path, final: Path) -> None:
        """Rename the finished checkpoint in, point ``latest`` at it, prune the old ones."""
        replaced = staging.with_name(f"{final.name}.replaced")
        if final.exists():  # an earlier run's folder of this name: aside first, never overwritten
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(staging, final)
        _write_atomic(self.root / LATEST, final.name)
        shutil.rmtree(replaced, ignore_errors=True)
        for script in staging.parent.glob("zero_to_*.py"):  # DeepSpeed's converters, beside the checkpoints
            os.replace(script, self.root / script.name)
        self._prune(newest=final.name)

    def _prune(self, *, newest: str) -> None:
        """Keep the ``keep`` newest complete checkpoints (the one just written among them) and
        nothing incomplete older than it."""
        keep = set(self.complete_tags()[: self.keep]) | {newest}
        for tag in self.tags():
            if tag not in keep and tag < newest:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    def load(self, engine: Any, path: Path) -> TrainState:
        """Restore model, optimizer, scheduler and RNG from a verified checkpoint; return the
        trainer's position."""
        try:
            with weights_only_loads():
                loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True, custom_load_fn=restore_module)
        except CodeInFile as exc:  # replaced after it was verified
            raise CheckpointError(f"{exc}. Fix: remove {path} (the resume then takes the checkpoint before it), "
                                  "or start over with train.resume=false") from None
        except Exception as exc:  # verified files that still do not fit this run's model or world
            raise CheckpointError(f"{path}: DeepSpeed cannot load it into this run ({type(exc).__name__}: "
                                  f"{str(exc)[:300]}). Fix: resume with the model, ZeRO stage and world size it was "
                                  "saved with, or start over with train.resume=false") from exc
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint there. Fix: start over with "
                                  "train.resume=false")
        state = _train_state(path / STATE_FILE)
        if state.world_size == self.info.world_size:
            restore_rng(path / f"rng_rank{self.info.rank}.pt")
        self.saved_step = state.step
        self.expected_bytes = _folder_bytes(path)
        return state


def _train_state(path: Path) -> TrainState:
    saved = json.loads(path.read_text())
    known = {f.name for f in fields(TrainState)}
    if not isinstance(saved, dict) or not set(saved) <= known:
        raise CheckpointError(f"{path}: not a trainer state this hpc-train writes (keys {sorted(saved)}). Fix: "
                              "start over with train.resume=false")
    return TrainState(**saved)


def lead_warning(took_s: float, env: Mapping[str, str] = os.environ) -> str | None:
    """A warning when saving a checkpoint took more than half of the lead the SLURM templates'
    time-limit warning gives (``HPC_TRAIN_WARNING_LEAD_S``, from ``WARNING_LEAD``), or None."""
    try:
        lead = float(env.get("HPC_TRAIN_WARNING_LEAD_S", ""))
    except ValueError:
        return None
    if not lead > 0 or took_s <= lead / 2:
        return None
    enough = 60 * math.ceil((2 * took_s + 60) / 60)
    return (f"warning: saving this checkpoint took {took_s:.0f} s, more than half of the {lead:g} s the job's "
            f"time-limit warning leaves (--signal=B:USR1@{lead:g}): a stop at that warning may not finish its "
            f"checkpoint before SLURM ends the job. Fix: sbatch --signal=B:USR1@{enough} slurm/<template>.slurm "
            f"WARNING_LEAD={enough}")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _attempt(path: Path, write: Callable[[], object], on_failure: Callable[[], None] | None = None) -> str | None:
    """Run ``write``; the message for a failed write into ``path``, or None (other errors raise)."""
    try:
        write()
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        if on_failure is not None:
            on_failure()
        return write_failure(path, exc)
    return None


def _from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (one directory listing decides for all nodes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, numbers and lists (loadable with ``weights_only=True``)."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(path: Path) -> None:
    """Set every generator from a file :func:`_rng_state` wrote; tensors and numbers only, so a
    file planted in the output folder cannot run code in the job."""
    _set_rng_state(load_data(path))


def _set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
