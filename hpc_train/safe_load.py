"""Reading weights files back as data, never as code.

A ``.pt`` file is a pickle, and a pickle can name any function to call while it is read:
``torch.load(..., weights_only=False)`` — what DeepSpeed's checkpoint loader passes — runs
whatever a file planted in the checkpoint folder asks for. Checkpoints are shared (a colleague's
run, a copied folder, a preempted job's scratch space), so every file a resume reads goes
through PyTorch's ``weights_only`` unpickler here: tensors, numbers, strings, containers, and
exactly the classes below, which DeepSpeed's own files hold.

- ``LossScaler`` (``deepspeed.runtime.fp16.loss_scaler``), the optimizer state's loss scaler:
  a plain object rebuilt by setting its attributes (no ``__setstate__``, ``__reduce__`` or
  ``__init__`` runs), which are numbers and flags.
- ``ZeroStageEnum`` (``deepspeed.runtime.zero.config``), the ZeRO stage in the optimizer
  state: an ``int`` enum, rebuilt by looking its value up among its members.
- ``fragment_address`` (``deepspeed.utils.tensor_fragment``), where each weight sits in a
  ZeRO-2 flat buffer: a dataclass of two ints, rebuilt by setting its fields.

:func:`weights_only_loads` applies this to every ``torch.load`` while DeepSpeed reads a
checkpoint, whatever it passes; :func:`code_problem` finds a file that would need anything else
before a resume picks its checkpoint (:mod:`hpc_train.train.manifest`), so that checkpoint is
skipped like a corrupted one. transformers and PEFT read ``.bin`` weights with the same
unpickler; :func:`refusing_code` turns its refusal into one message naming the file.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hpc_train.errors import HpcTrainError


class CodeInFile(HpcTrainError):
    """A file the weights-only unpickler refuses: it names a function or class to call (or is not
    a pickle of data at all)."""

    def __init__(self, path: Path | str, unpickler_error: str, fix: str | None = None) -> None:
        self.refusal = _refusal(unpickler_error)
        super().__init__(f"{path}: {self.refusal}{f'. Fix: {fix}' if fix else ''}")


def allowed_classes() -> list[type]:
    """The classes beyond PyTorch's own that DeepSpeed's checkpoint files hold (see above)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_data(path: Path | str, *, map_location: Any = None, mmap: bool = False) -> Any:
    """``torch.load`` of ``path`` with the weights-only unpickler and :func:`allowed_classes`;
    :class:`CodeInFile` for a file that needs anything else."""
    return _load(path, map_location=map_location, mmap=mmap)


def code_problem(path: Path, name: str) -> str | None:
    """Why the weights-only unpickler refuses the ``.pt`` file ``path`` (``name`` in messages), or
    None. Reads its pickle only: the tensors are mapped, not read."""
    try:
        load_data(path, map_location="cpu", mmap=zipfile.is_zipfile(path))
    except CodeInFile as exc:
        return f"{name} {exc.refusal}"
    except Exception as exc:  # noqa: BLE001 - any other failure to read it back is a problem too
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return f"{name} cannot be read back ({type(exc).__name__}: {first})"
    return None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within it, ``torch.load`` unpickles with the weights-only unpickler and
    :func:`allowed_classes`, whatever its caller passes for ``weights_only`` (DeepSpeed passes
    False). Not thread-safe: for the main thread's checkpoint load."""
    def load(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: bool | None = None,
             mmap: bool | None = None, **kwargs: Any) -> Any:
        return _load(f, map_location=map_location, mmap=mmap, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = _ORIGINAL_LOAD


_ORIGINAL_LOAD = torch.load


@contextlib.contextmanager
def refusing_code(folder: Path, setting: str) -> Iterator[None]:
    """Within it, a ``.bin`` weights file of ``folder`` that the weights-only unpickler refuses
    (transformers and PEFT read them with it) stops the run with one message naming the file."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        files = ", ".join(sorted(p.name for p in folder.glob("*.bin"))) or "a weights file"
        raise CodeInFile(folder / files, str(exc), f"use a copy of {setting} from a source you trust, ideally "
                         "saved as .safetensors (tensors only)") from None


def _load(f: Any, *, map_location: Any, mmap: bool | None, **kwargs: Any) -> Any:
    with torch.serialization.safe_globals(allowed_classes()):
        try:
            return _ORIGINAL_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
        except pickle.UnpicklingError as exc:
            raise CodeInFile(f if isinstance(f, (str, Path)) else getattr(f, "name", "a file"), str(exc)) from None


def _refusal(unpickler_error: str) -> str:
    """What the file asked for, without PyTorch's advice to load it with ``weights_only=False``."""
    named = re.search(r"GLOBAL ([\w.]+)", unpickler_error)
    if named:
        return f"refused: reading it would call {named.group(1)} (weights files may hold data, never code)"
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", unpickler_error)
    return f"cannot be read back as data ({detail.group(1).strip().rstrip('.') if detail else 'not a torch file'})"


__all__ = ["CodeInFile", "allowed_classes", "code_problem", "load_data", "refusing_code",
           "weights_only_loads"]
