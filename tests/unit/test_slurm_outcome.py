"""The batch job's last decision (``hpc_train/slurm_outcome.py``, run by ``slurm/common.sh``):
requeue only for progress, never forever, and never hide a failure that followed a warning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpc_train.slurm_outcome import decide

SAVED = {"signal": "SIGUSR1", "step": 12, "checkpoint": "out/checkpoints/step-00000012", "exit_code": 75}


def outcome(**changes):
    given = {"signal": "USR1", "status": 75, "marker": SAVED, "start_step": 4, "restarts": 0, "max_requeues": 3,
             "job_state": "RUNNING", **changes}
    return decide(**given)


def test_a_warning_that_saved_a_newer_checkpoint_requeues():
    got = outcome()
    assert got.action == "requeue" and got.status == 0
    assert "checkpoint saved at step 12" in got.message and "restart 1 of at most 3" in got.message
    assert outcome(signal="TERM").action == "requeue"  # a preemption's SIGTERM, in its grace time


@pytest.mark.parametrize(("status", "marker"), [(1, None), (134, None), (1, {**SAVED, "step": 4})])
def test_a_failure_after_the_warning_ends_the_job_failed(status, marker):
    got = outcome(status=status, marker=marker)
    assert got.action == "fail" and got.status == status
    assert f"failed with exit status {status} after SIGUSR1" in got.message and "not requeued" in got.message


def test_a_stop_without_progress_is_not_requeued_again():
    """The marker of the checkpoint the job started from (or none at all): another allocation
    would stop at the same place."""
    for marker, start in ((SAVED, 12), (None, -1)):
        got = outcome(marker=marker, start_step=start)
        assert got.action == "fail" and got.status == 1 and "a requeue would make no progress" in got.message


def test_the_requeue_cap_ends_a_job_that_keeps_coming_back():
    got = outcome(restarts=3)
    assert got.action == "fail" and "already requeued 3 times (MAX_REQUEUES=3)" in got.message


@pytest.mark.parametrize("state", ["COMPLETING", "CANCELLED", "TIMEOUT", ""])
def test_a_job_slurm_is_ending_is_not_requeued_here(state):
    """A scancel or the time limit marks the job COMPLETING at once; a requeue then would undo a
    user's cancel (SLURM accepts it)."""
    got = outcome(signal="TERM", job_state=state)
    assert got.action == "done" and "SLURM is ending the job" in got.message and "not requeued" in got.message


def test_ranks_signalled_past_the_batch_shell_still_requeue_for_their_checkpoint():
    """``scancel --signal=USR1 <job>`` without ``--batch`` reaches the steps only: the ranks stop
    with 75 and their marker, and the batch shell saw nothing."""
    got = outcome(signal="")
    assert got.action == "requeue" and "after SIGUSR1" in got.message


def test_without_a_signal_the_step_s_status_is_the_job_s():
    assert outcome(signal="", status=0).action == "done"
    got = outcome(signal="", status=3)
    assert got.action == "fail" and got.status == 3 and "failed with exit status 3" in got.message


def test_the_batch_shell_reads_the_output_folder_as_the_run_left_it(tmp_path):
    def ask(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "hpc_train.slurm_outcome", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert ask("start", str(tmp_path)) == "-1"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000004\n")
    assert ask("start", str(tmp_path)) == "4"
    (tmp_path / "requeue.json").write_text(json.dumps(SAVED))
    line = ask("end", str(tmp_path), "--signal", "USR1", "--status", "75", "--start-step", "4", "--restarts", "2",
               "--max-requeues", "5", "--job-state", "RUNNING")
    assert line.startswith("requeue 0 checkpoint saved at step 12")


@pytest.mark.parametrize(("took", "lead", "said"), [
    (100.0, "300", None),          # a third of the lead: room to spare
    (200.0, "300", "sbatch --signal=B:USR1@480 slurm/<template>.slurm WARNING_LEAD=480"),
    (200.0, None, None),           # not a SLURM template's run: no lead to compare with
    (200.0, "soon", None),
])
def test_a_checkpoint_slower_than_half_the_warning_lead_is_said_with_a_lead_that_fits(took, lead, said):
    from hpc_train.train.checkpoint import lead_warning

    env = {} if lead is None else {"HPC_TRAIN_WARNING_LEAD_S": lead}
    warning = lead_warning(took, env)
    assert (warning is None) == (said is None)
    if said:
        assert "took 200 s, more than half of the 300 s" in warning and said in warning
