"""What a batch job does once its ranks stopped: requeue itself, end done, or end failed.

``slurm/common.sh`` asks here after the launch step ends, with what it saw: the signal it got
(``USR1``: the warning before the time limit; ``TERM``: preemption, a time limit, or a
``scancel``), the step's exit status, the checkpoint step the job started from, its restart
count and the job's state as SLURM has it. The rules, so that a lasting failure cannot requeue
forever and a crash after a warning is never hidden:

- requeue only when the ranks saved a checkpoint newer than the one the job started from
  (``requeue.json`` says which), and fewer than ``max_requeues`` restarts happened;
- only a job SLURM still has RUNNING: once it ends the job (a ``scancel``, the time limit, a
  preemption's end) the state is COMPLETING, and SLURM would accept a requeue then, undoing a
  user's cancel;
- a stop without a newer checkpoint, or a failure after the signal, ends the job failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REQUEUE_MARKER = "requeue.json"
"""What rank 0 writes in the output folder when the ranks stopped on a signal, after a checkpoint
(its step and path). Defined here, not imported from the training code: the batch shell runs this
module in the grace time before SLURM kills the job, so it imports nothing heavy."""
REQUEUE_EXIT_CODE = 75
"""EX_TEMPFAIL: what a rank (and ``launch/torchrun.sh``) exits with after such a stop."""



@dataclass(frozen=True)
class Outcome:
    action: str
    """``requeue`` (``scontrol requeue`` the job, exit 0), ``done`` or ``fail``."""
    status: int
    """The batch script's exit status."""
    message: str


def decide(*, signal: str, status: int, marker: dict | None, start_step: int, restarts: int, max_requeues: int,
           job_state: str) -> Outcome:
    """The batch job's outcome (see the module's rules). ``start_step``: the newest checkpoint's
    step when the job started (-1: none); ``marker``: ``requeue.json`` as the ranks left it."""
    if not signal and status == REQUEUE_EXIT_CODE and isinstance(marker, dict):
        # the ranks were signalled past the batch shell (scancel --signal=USR1 without --batch)
        signal = str(marker.get("signal", "")).removeprefix("SIG")
    if not signal:
        return Outcome("done", 0, "done") if status == 0 else Outcome(
            "fail", status, f"failed with exit status {status} (see the ranks' messages above)")
    saved = marker.get("step") if isinstance(marker, dict) else None
    if isinstance(saved, int) and saved > start_step:
        where = f"checkpoint saved at step {saved} ({marker.get('checkpoint')}) after SIG{signal}"
        if job_state != "RUNNING":
            return Outcome("done", 0, f"{where}; SLURM is ending the job (JobState {job_state or 'unknown'}: a "
                                      "scancel, the time limit or a preemption): not requeued here (resubmit to go on)")
        if restarts >= max_requeues:
            return Outcome("fail", 1, f"{where}; the job was already requeued {restarts} times (MAX_REQUEUES="
                                      f"{max_requeues}): not again. Fix: resubmit, or raise MAX_REQUEUES")
        return Outcome("requeue", 0, f"{where}; requeueing job (restart {restarts + 1} of at most {max_requeues})")
    if status not in (0, REQUEUE_EXIT_CODE):
        return Outcome("fail", status, f"failed with exit status {status} after SIG{signal}, before a checkpoint "
                                       "was saved (see the ranks' messages above): not requeued")
    if status == 0:
        return Outcome("done", 0, f"finished before SIG{signal} could stop it")
    begun = f"step {start_step}" if start_step >= 0 else "the start"
    return Outcome("fail", 1, f"stopped after SIG{signal} with no checkpoint newer than {begun}, where this job "
                              "began: a requeue would make no progress, so the job ends here. Fix: give the job more "
                              "time than loading the model takes plus the warning's lead (sbatch --time / --signal)")


def checkpoint_step(output_dir: Path) -> int:
    """The step of the checkpoint ``checkpoints/latest`` names (-1: none)."""
    try:
        name = (output_dir / "checkpoints" / "latest").read_text().strip()
        return int(name.rsplit("-", 1)[1])
    except (OSError, IndexError, ValueError):
        return -1


def read_marker(output_dir: Path) -> dict | None:
    try:
        marker = json.loads((output_dir / REQUEUE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def main(argv: list[str] | None = None) -> int:
    """``python -m hpc_train.slurm_outcome start OUTPUT_DIR``: the checkpoint step a job starts
    from; ``... end OUTPUT_DIR ...``: one line, ``<action> <status> <message>``."""
    parser = argparse.ArgumentParser(prog="python -m hpc_train.slurm_outcome")
    parser.add_argument("when", choices=("start", "end"))
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--signal", default="")
    parser.add_argument("--status", type=int, default=0)
    parser.add_argument("--start-step", type=int, default=-1)
    parser.add_argument("--restarts", type=int, default=0)
    parser.add_argument("--max-requeues", type=int, default=20)
    parser.add_argument("--job-state", default="")
    args = parser.parse_args(argv)
    if args.when == "start":
        print(checkpoint_step(args.output_dir))
        return 0
    outcome = decide(signal=args.signal, status=args.status, marker=read_marker(args.output_dir),
                     start_step=args.start_step, restarts=args.restarts, max_requeues=args.max_requeues,
                     job_state=args.job_state)
    print(outcome.action, outcome.status, outcome.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["REQUEUE_EXIT_CODE", "REQUEUE_MARKER", "Outcome", "checkpoint_step", "decide", "main", "read_marker"]
