"""A checkpoint's manifest: every file with its size and SHA-256, written last.

A checkpoint folder counts as complete only when its manifest exists and every file it lists is
there with that size and checksum. Hashing is shared out over the ranks (file ``i`` to rank
``i % world``), both when a checkpoint is written and when one is verified before a resume. A
verified ``.pt`` file must also read back as data (:mod:`hpc_train.safe_load`): one that
would run code while it is read fails the checkpoint like a corrupted file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hpc_train.dist import all_gather
from hpc_train.safe_load import code_problem

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 8 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _share(names: list[str]) -> list[str]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return names[rank::world]


def files_of(folder: Path) -> list[str]:
    """Every file below ``folder``, relative and sorted, the manifest itself left out."""
    found = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(name for name in found if name != MANIFEST)


def write_manifest(folder: Path, *, step: int, world_size: int, main: bool) -> None:
    """Collective: hash this rank's share of the folder's files; the main rank writes the manifest."""
    names = files_of(folder)  # every rank lists after the same barrier, so the lists agree
    mine = {name: {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)} for name in _share(names)}
    files: dict[str, Any] = {}
    for part in all_gather(mine):
        files.update(part)
    if main:
        body = {"format": FORMAT, "step": step, "world_size": world_size, "files": dict(sorted(files.items()))}
        tmp = folder / f".{MANIFEST}.tmp"
        with open(tmp, "w") as fh:
            json.dump(body, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, or ``ValueError`` saying why there is no usable one."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError("no manifest (the save did not finish, or an older hpc-train wrote it)")
    try:
        body = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"the manifest cannot be read ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("files"), dict):
        raise ValueError("the manifest is not one this hpc-train writes")
    return body


def problems(folder: Path) -> list[str]:
    """Collective: what is wrong with the checkpoint in ``folder`` (empty: it verifies)."""
    found: list[str] = []
    try:
        listed = read_manifest(folder)["files"]
    except ValueError as exc:  # still one gather below, as on every other rank
        listed, found = {}, [str(exc)]
    for name in _share(sorted(listed)):
        found += _file_problems(folder / name, name, listed[name])
    return sorted({p for part in all_gather(found) for p in part})


def _file_problems(path: Path, name: str, expected: dict[str, Any]) -> list[str]:
    try:
        size = path.stat().st_size
    except OSError:
        return [f"{name} is missing"]
    if size != expected.get("size"):
        return [f"{name} has {size} bytes, the manifest says {expected.get('size')} (truncated or overwritten)"]
    if sha256(path) != expected.get("sha256"):
        return [f"{name} does not match its checksum (corrupted)"]
    refused = code_problem(path, name) if name.endswith(".pt") else None
    return [refused] if refused else []
