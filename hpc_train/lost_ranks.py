"""Which rank a failed collective lost.

A collective whose peer died fails on the survivors with the transport's words (gloo:
"Connection closed by peer [10.0.0.7]:41234"), which name an address, not a rank. So every
rank of a distributed run beats on the process group's store (a counter of its own, bumped
every :data:`BEAT_S` seconds from a daemon thread), and a survivor names the ranks whose
counter stopped: their process ended or their node is unreachable. A rank that is only waiting
in the failed collective still beats, so it is not named. The store is the launcher's (torchrun's
agent) or rank 0's (srun, mpirun, the DeepSpeed launcher): one that no longer answers under the
latter means rank 0 itself is gone.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
import threading
import time

import torch.distributed as dist

BEAT_S = 0.5
"""Seconds between two beats of a rank."""
MISSED_BEATS = 3
"""Beats a survivor waits for before it names a rank whose counter did not move."""
_KEY = "hpc-train/beat/{rank}"
_PEER_GONE = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe|remote process exited|ECONNRESET|EPIPE",
                        re.IGNORECASE)
"""How gloo (and NCCL, where it raises) says a peer went away; a timeout is a peer that hangs, not this."""

_store: dist.Store | None = None
_stop = threading.Event()
_beater: threading.Thread | None = None


def start_beating(rank: int, world_size: int) -> None:
    """Beat on the store of the process group just joined (nothing in a world of one)."""
    global _store, _beater
    if world_size < 2 or _store is not None:
        return
    try:
        _store = _client()
    except Exception:  # noqa: BLE001 - no beat means only a less specific message on a loss
        return
    _beater = threading.Thread(target=_beat, args=(_store, rank), name="hpc-train-beat", daemon=True)
    _beater.start()
    atexit.register(stop_beating)


def stop_beating() -> None:
    """End the beat before the interpreter does: a daemon thread still inside the store's C++ call
    when Python finalizes is unwound through it, and the process aborts ("terminate called
    without an active exception") after a run that succeeded."""
    _stop.set()
    if _beater is not None and _beater is not threading.current_thread():
        _beater.join(timeout=4 * BEAT_S)


def peer_gone(exc: BaseException) -> str | None:
    """The transport's words when ``exc`` is a collective that lost a peer, else None."""
    if not isinstance(exc, RuntimeError):  # torch.distributed's errors are RuntimeErrors
        return None
    found = _PEER_GONE.search(str(exc))
    return found.group(0) if found else None


def lost_ranks(rank: int, world_size: int) -> list[int] | None:
    """The ranks whose beat stopped (waits :data:`MISSED_BEATS` beats); None when the store no
    longer answers either."""
    if _store is None:
        return None
    others = [r for r in range(world_size) if r != rank]
    try:
        before = [_store.add(_KEY.format(rank=r), 0) for r in others]
        time.sleep(MISSED_BEATS * BEAT_S)
        after = [_store.add(_KEY.format(rank=r), 0) for r in others]
    except Exception:  # noqa: BLE001 - the store is gone with its host
        return None
    return [r for r, a, b in zip(others, before, after, strict=True) if a == b]


def store_host_is_rank_0() -> bool:
    """Whether rank 0's process holds the store (every launcher but torchrun, whose agent does)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"


def _client() -> dist.TCPStore:
    """A connection of our own to the process group's store, with a short timeout (the group's
    own is half an hour)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=10), wait_for_workers=False)


def _beat(store: dist.Store, rank: int) -> None:
    key = _KEY.format(rank=rank)
    while not _stop.is_set():
        try:
            store.add(key, 1)
        except Exception:  # noqa: BLE001 - the store is gone: the run is failing anyway
            return
        _stop.wait(BEAT_S)


__all__ = ["BEAT_S", "lost_ranks", "peer_gone", "start_beating", "stop_beating", "store_host_is_rank_0"]
