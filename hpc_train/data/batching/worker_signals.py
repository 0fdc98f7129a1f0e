"""DataLoader workers that outlive a scheduler's stop signal but not their own rank.

SLURM (and ``kill -TERM -<pgid>``) signals every process of a job step, the rank's DataLoader
workers included; only the rank decides to stop, at a step boundary, so its workers must keep
serving batches until then. But a rank that is ending (a failure, or its normal exit) stops its
workers with SIGTERM too, and a worker that ignored every SIGTERM kept the dying rank waiting for
it until the launcher's 30 s kill. So a worker tells the senders apart: SIGTERM from its own
rank ends it at once, from anyone else it is ignored; SIGUSR1 is always ignored.

A worker also dies with its rank (Linux's parent-death signal): a forked worker holds copies of
the rank's sockets, so while it lived on, the other ranks saw no closed connection and waited
(about 5 s, until torch's watchdog noticed the dead parent) before their collective failed.
"""

from __future__ import annotations

import os
import signal
import threading

from hpc_train.parent_death import signal_on_parent_death


def survive_group_signals(worker_id: int) -> None:
    """``worker_init_fn``: ignore the job's stop signals, obey the rank's SIGTERM, die with the rank."""
    signal_on_parent_death(signal.SIGKILL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Blocked in this thread (and the threads it starts), SIGTERM waits for sigwaitinfo, which
    # says who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True,
                     name=f"worker-{worker_id}-sigterm").start()


def _end_on_sigterm_from(rank_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == rank_pid:
            os._exit(0)  # the rank is shutting its workers down; nothing of ours is left to flush


__all__ = ["survive_group_signals"]
