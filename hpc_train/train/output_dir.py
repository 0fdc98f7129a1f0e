"""The run's output folder: writable before anything is loaded, with room for a checkpoint
before each one is written, and one message naming the path and a fix when a write fails.

Every rank checks and the ranks agree (:func:`agreed`), so all of them stop with the same
message at the same point instead of one raising while the others wait in a collective.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpc_train.errors import HpcTrainError

MIB = 2**20
FIX_WRITABLE = ("set output_dir (OUTPUT_DIR in the SLURM templates) to a writable folder on a filesystem every "
                "node sees")
FIX_SPACE = ("free space on that filesystem, lower train.keep_checkpoints, or set output_dir to a larger one; "
             "then run the same command again: it resumes from the newest complete checkpoint")
HEADROOM = 1.05
"""Room asked for beyond a checkpoint's size (its manifest, the trainer's files)."""


class OutputError(HpcTrainError):
    """The output folder cannot be written, or has no room for what the run writes next."""


def existing_parent(path: Path) -> Path:
    """The folder itself, or the nearest parent that exists (where it would be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_probe(folder: Path) -> OSError | None:
    """Create and remove a file in ``folder``, for real: as root, permission bits say nothing."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hpc-train-write-test-"):
            pass
    except OSError as exc:
        return exc
    return None


def output_problem(path: Path) -> str | None:
    """Why the run cannot write into ``path`` (made here if missing), or None."""
    path = path.absolute()
    base = existing_parent(path)
    if not base.is_dir():
        return f"output_dir {path}: {base} is a file, not a folder. Fix: {FIX_WRITABLE}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"output_dir {path} is not writable ({exc.strerror}: {exc.filename}). Fix: {FIX_WRITABLE}"
    failed = write_probe(path)
    if failed is not None:
        return f"output_dir {path} is not writable ({failed.strerror}: {failed.filename}). Fix: {FIX_WRITABLE}"
    return None


def checkpoint_bytes(model: Any) -> int:
    """About what one checkpoint of ``model`` takes: every weight in its dtype, and for each
    trainable one an fp32 master copy and Adam's two moments (ZeRO-3's partitioned weights
    counted whole)."""
    def numel(t: Any) -> int:
        return int(getattr(t, "ds_numel", t.numel()))

    weights = sum(numel(t) * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return weights + 12 * trainable


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write into ``path`` into one :class:`OutputError` with the path and a fix."""
    try:
        yield
    except Exception as exc:
        if is_write_failure(exc):
            raise OutputError(write_failure(path, exc)) from exc
        raise


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_parent(path)).free


def room_problem(path: Path, need: int, what: str) -> str | None:
    """An error when the filesystem of ``path`` has less than ``need`` bytes (with headroom) free."""
    free = free_bytes(path)
    if free >= need * HEADROOM:
        return None
    return (f"not enough free space for {what} in {path}: it needs about {need / MIB:.1f} MiB and a "
            f"{HEADROOM - 1:.0%} margin ({need * HEADROOM / MIB:.1f} MiB in all), {free / MIB:.1f} MiB are free. "
            f"Fix: {FIX_SPACE}")


def is_write_failure(exc: BaseException) -> bool:
    """A full disk, a read-only or vanished folder, as torch, safetensors and the OS report it."""
    if isinstance(exc, OSError):
        return True
    text = str(exc).lower()
    return type(exc).__name__ == "SafetensorError" or (
        isinstance(exc, RuntimeError) and ("write" in text or "inline_container" in text))


_OS_REASON = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system|Permission denied|"
                        r"No such file or directory|Input/output error")


def write_failure(path: Path, exc: BaseException) -> str:
    """The message for a failed write into ``path``; torch's and safetensors' wrappings of the
    OS error are reduced to the OS's own words."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        found = _OS_REASON.search(str(exc))
        reason = found.group() if found else str(exc).splitlines()[0][:200]
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        reason in ("No space left on device", "Disk quota exceeded")
    return f"cannot write {path} ({reason}; {_free_text(path)}). Fix: {FIX_SPACE if full else FIX_WRITABLE}"


def _free_text(path: Path) -> str:
    st = os.statvfs(existing_parent(path))
    text = f"{st.f_bavail * st.f_frsize / MIB:.1f} MiB free there"
    return text + (", but no file can be created: its file count (inodes) is used up"
                   if st.f_files and not st.f_favail else "")


def agreed(problem: str | None) -> str | None:
    """The first rank's problem, on every rank (None when no rank has one). Collective."""
    from hpc_train.dist import all_gather  # here: the doctor imports this module without torch

    return next((p for p in all_gather(problem) if p is not None), None)


__all__ = ["FIX_SPACE", "FIX_WRITABLE", "OutputError", "agreed", "checkpoint_bytes", "existing_parent", "free_bytes",
           "is_write_failure", "output_problem", "room_problem", "write_failure", "write_probe", "writing"]
