"""A real SLURM (controller + 2 node daemons + munge) on this machine, once per session,
and helpers to submit the shipped templates to it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.distributed.conftest import child_env, train_args  # noqa: F401  (train_args: a fixture)

ROOT = Path(__file__).resolve().parents[2]
BASE = Path("/tmp/hpc-train-test-slurm")
PORT = "16957"  # not the default: a developer's own local SLURM may be running
JOB_TIMEOUT_S = 420


def slurm_env() -> dict[str, str]:
    env = child_env()
    env.update({"SLURM_CONF": str(BASE / "etc" / "slurm.conf"), "VENV": sys.prefix,
                "LOCAL_SLURM_BASE": str(BASE), "LOCAL_SLURM_PORT": PORT})
    return env


def local_slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "launch" / "local-slurm.sh"), *args], env=slurm_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="session")
def cluster() -> Iterator[dict[str, str]]:
    """Two SLURM nodes with two (fake) GPUs each, as a GPU cluster schedules them."""
    already = local_slurm("status").returncode == 0
    started = local_slurm("start", "--nodes", "2", "--cpus", "8", "--gpus", "2")
    assert started.returncode == 0, started.stdout + started.stderr
    yield slurm_env()
    if not already:
        local_slurm("stop", "--purge")


def sbatch(env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", *args], env={**env, **(extra_env or {})}, cwd=ROOT, capture_output=True,
                          text=True, timeout=JOB_TIMEOUT_S)


def job_state(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait_for_job(env: dict[str, str], job: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """The job's final state (COMPLETED, FAILED, ...), or a failure naming the state it hung in."""
    deadline = time.monotonic() + timeout
    state: dict[str, str] = {}
    while time.monotonic() < deadline:
        state = job_state(env, job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env, timeout=30)
    raise AssertionError(f"job {job} did not end in {timeout} s; last state {state.get('JobState')} "
                         f"({state.get('Reason')})")


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def processes_of_job(job: str, node: str) -> list[int]:
    """Training processes (torchrun workers) of a job on one node, by their environment."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"SLURM_JOB_ID={job}".encode() in environ and f"SLURMD_NODENAME={node}".encode() in environ
                and any(v.startswith(b"LOCAL_RANK=") for v in environ) and b"hpc_train" in cmdline):
            found.append(int(proc.name))
    return found


def log_of(path: Path) -> str:
    return path.read_text() if path.is_file() else f"(no log at {path})"


def job_failure(state: dict[str, str], log: str) -> str:
    """What to read when a job did not complete: its end state, the daemons' lines about it
    (a job killed from outside prints nothing in its own log) and its log's tail."""
    job = state.get("JobId", "?")
    about_job = re.compile(rf"\b(JobId=|job |StepId=){job}\b")
    daemons = [f"{path.name}: {line}" for path in sorted((BASE / "log").glob("slurm*.log"))
               for line in path.read_text(errors="replace").splitlines() if about_job.search(line)]
    return (f"job {job}: {state.get('JobState')} exit {state.get('ExitCode')} "
            f"reason {state.get('Reason')}\n" + "\n".join(daemons[-30:]) + "\n--- log tail ---\n" + log[-5000:])


