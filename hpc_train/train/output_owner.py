"""One run at a time in an output folder.

Two jobs writing one folder (two submissions with the templates' default ``output_dir``, a
resubmission while a requeued job waits) would resume from each other's checkpoints and
overwrite each other's. Rank 0 claims the folder before the run writes anything: it leaves
``.hpc-train-owner.json`` there (SLURM job, host, process) and refuses a folder whose owner
still runs — a SLURM job SLURM has not ended (a requeued one waiting to run again included),
or a process alive on this host. The same job coming back (a requeue, a restarted step) takes
its own folder again; an owner that ended, or that cannot be checked from here (another host,
no SLURM), is taken over and said. The claim is dropped when the run finishes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from hpc_train.train.output_dir import OutputError, agreed

OWNER_FILE = ".hpc-train-owner.json"
ENDED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                          "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"})
"""SLURM job states after which the job never runs again (any other state may still write)."""


@dataclass(frozen=True)
class Owner:
    job: str | None
    """SLURM_JOB_ID of the run's job (each array task has its own), None outside SLURM."""
    host: str
    pid: int
    started: str


def this_run(env: Mapping[str, str] = os.environ) -> Owner:
    return Owner(job=env.get("SLURM_JOB_ID") or None, host=socket.gethostname(), pid=os.getpid(),
                 started=datetime.now(UTC).isoformat(timespec="seconds"))


def slurm_job_state(job: str) -> str | None:
    """The job's state as SLURM has it now; None when SLURM does not know it (any more) or
    cannot be asked from here."""
    try:
        asked = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = asked.stdout.split()
    return words[0] if asked.returncode == 0 and words else None


def runs_hpc_train(pid: int) -> bool:
    """Whether process ``pid`` on this host is alive and an hpc-train process (not another one
    that got the number since)."""
    try:
        return b"hpc_train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def still_running(owner: Mapping[str, object], me: Owner, *,
                  job_state: Callable[[str], str | None] = slurm_job_state,
                  process_alive: Callable[[int], bool] = runs_hpc_train) -> str | None:
    """How ``owner`` (a claim found in the folder) still runs, or None when it does not or
    cannot be known to."""
    job, host, pid = owner.get("job"), owner.get("host"), owner.get("pid")
    if job:
        if str(job) == me.job:
            return None  # this job, back after a requeue or a restart
        state = job_state(str(job))
        return f"SLURM job {job} ({state})" if state and state not in ENDED_STATES else None
    if host == me.host and isinstance(pid, int) and pid != me.pid and process_alive(pid):
        return f"process {pid} on {host}"
    return None


def read_owner(folder: Path) -> dict | None:
    try:
        found = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def claim(folder: Path, me: Owner, *, job_state: Callable[[str], str | None] = slurm_job_state,
          process_alive: Callable[[int], bool] = runs_hpc_train) -> tuple[str | None, str | None]:
    """Claim ``folder`` for this run (rank 0, before anything is written there): ``(refusal,
    note)``, the refusal naming the run that holds it, the note a previous owner taken over."""
    found = read_owner(folder)
    note = None
    if found is not None:
        running = still_running(found, me, job_state=job_state, process_alive=process_alive)
        if running:
            return (f"output_dir {folder} is in use by {running}, which began there at {found.get('started')}: two "
                    "runs in one folder would resume from and overwrite each other's checkpoints. Fix: give this "
                    "run its own output_dir (OUTPUT_DIR=... in the SLURM templates), or wait for that run to end "
                    f"(or stop it); {folder / OWNER_FILE} says who holds the folder"), None
        if found.get("job") != me.job:  # the same job back after a requeue takes its folder without a word
            was = f"SLURM job {found['job']}" if found.get("job") else f"process {found.get('pid')} on {found.get('host')}"
            note = f"output_dir {folder}: taken over from {was} (not running, as far as {me.host} can tell)"
    (folder / OWNER_FILE).write_text(json.dumps(asdict(me)))
    return None, note


def claim_for_run(folder: Path, is_main: bool) -> None:
    """Rank 0 claims ``folder``; every rank raises the same :class:`OutputError` when another
    run holds it. Collective."""
    refusal, note = claim(folder, this_run()) if is_main else (None, None)
    refusal = agreed(refusal)
    if refusal:
        raise OutputError(refusal)
    if note:
        print(note, flush=True)


def release(folder: Path, me: Owner) -> None:
    """Drop this run's claim (a finished run's folder is anyone's to continue)."""
    found = read_owner(folder)
    if found is not None and found.get("job") == me.job and found.get("pid") == me.pid:
        (folder / OWNER_FILE).unlink(missing_ok=True)


__all__ = ["ENDED_STATES", "OWNER_FILE", "Owner", "claim", "claim_for_run", "read_owner", "release", "runs_hpc_train",
           "slurm_job_state", "still_running", "this_run"]
