"""Storing the features a training step computed, off the step's path.

The rows leave the device by a copy that does not wait (into pinned memory on a GPU) and a
background thread writes them once the copy is done, so a step never waits for the device or
the filesystem. One writer per cache folder and process; :func:`flush_writers` waits for every
queued entry (the run calls it before it ends; an entry lost to a crash is only a miss).
"""

from __future__ import annotations

import atexit
import queue
import threading
import warnings
from typing import Any

import torch

from hpc_train.data.caches.feature_store import FeatureStore
from hpc_train.models.cached_vision import CachedFeatures, to

_QUEUE = 256
"""Entries waiting at most: a slow filesystem then holds back a step instead of the host memory."""


class FeatureWriter:
    """Writes entries into one :class:`FeatureStore` from a background thread."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.failures = 0
        self._queue: queue.Queue[tuple[str, torch.Tensor, Any] | None] = queue.Queue(_QUEUE)
        self._thread = threading.Thread(target=self._run, name="hpc-train-feature-writer", daemon=True)
        self._thread.start()

    def put(self, key: str, rows: torch.Tensor) -> None:
        """Queue ``rows`` (on any device) for ``key``."""
        rows = rows.detach()
        if rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = rows.clone(), None
        self._queue.put((key, host, done))

    def flush(self) -> None:
        """Wait until every queued entry is written."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is not None:
                    key, host, done = item
                    if done is not None:
                        done.synchronize()
                    self._save(key, host)
            finally:
                self._queue.task_done()

    def _save(self, key: str, host: torch.Tensor) -> None:
        try:
            self.store.save(key, host)
        except OSError as exc:  # a full or read-only disk costs the cache, not the run
            self.failures += 1
            if self.failures == 1:
                warnings.warn(f"data.vision_cache: cannot write {self.store.path_for(key)} ({exc}); "
                              "training goes on, recomputing what is not stored", stacklevel=1)


_WRITERS: dict[str, FeatureWriter] = {}
_LOCK = threading.Lock()


def writer_for(root: str) -> FeatureWriter:
    """This process's writer into the cache at ``root``."""
    with _LOCK:
        if root not in _WRITERS:
            _WRITERS[root] = FeatureWriter(FeatureStore(root))
        return _WRITERS[root]


def store_computed(features: CachedFeatures) -> int:
    """Queue the rows a forward computed for the samples not cached yet; how many entries."""
    queued = 0
    for kind, rows in features.kinds.items():
        computed = features.computed.get(kind)
        if computed is None:
            continue
        for key, at in rows.to_store:
            writer_for(features.root).put(key, computed[to(at, computed.device)])
            queued += 1
    return queued


def flush_writers() -> None:
    """Wait for every writer of this process."""
    for writer in list(_WRITERS.values()):
        writer.flush()


atexit.register(flush_writers)


__all__ = ["FeatureWriter", "flush_writers", "store_computed", "writer_for"]
