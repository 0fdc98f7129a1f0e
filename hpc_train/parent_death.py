"""Ask Linux to signal this process when the process that started it dies.

A process outliving its supervisor is the failure this guards against: a torchrun agent killed
by a signal leaves its ranks training unsupervised to the end; a DataLoader worker outliving
its rank keeps the rank's sockets open, so the other ranks wait before their collective fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def signal_on_parent_death(sig: signal.Signals) -> bool:
    """Deliver ``sig`` to this process when its parent (the thread that forked it) exits; False
    where the kernel has no such request (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig)) == 0
    except (OSError, AttributeError):
        return False


__all__ = ["signal_on_parent_death"]
