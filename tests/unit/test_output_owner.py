"""One run at a time in an output folder: who holds it, and when a claim is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from hpc_train.train.output_owner import (
    OWNER_FILE,
    claim,
    read_owner,
    release,
    runs_hpc_train,
    this_run,
)

STATES = {"41": "RUNNING", "42": "PENDING", "43": "COMPLETED"}


def state_of(job: str) -> str | None:
    return STATES.get(job)


def held_by(folder, **owner) -> None:
    (folder / OWNER_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then", **owner}))


@pytest.mark.parametrize(("job", "state"), [("41", "RUNNING"), ("42", "PENDING")])
def test_a_folder_held_by_a_job_slurm_still_has_is_refused(tmp_path, job, state):
    held_by(tmp_path, job=job)
    refusal, _ = claim(tmp_path, this_run({"SLURM_JOB_ID": "50"}), job_state=state_of)
    assert f"in use by SLURM job {job} ({state})" in refusal and "OUTPUT_DIR=" in refusal
    assert read_owner(tmp_path)["job"] == job  # the holder's claim stays


@pytest.mark.parametrize("job", ["43", "44"])  # ended, and no longer known to SLURM
def test_a_folder_whose_job_ended_is_taken_over_and_said(tmp_path, job):
    held_by(tmp_path, job=job)
    me = this_run({"SLURM_JOB_ID": "50"})
    refusal, note = claim(tmp_path, me, job_state=state_of)
    assert refusal is None and f"taken over from SLURM job {job}" in note
    assert read_owner(tmp_path)["job"] == "50" and read_owner(tmp_path)["pid"] == me.pid


def test_the_same_job_back_after_a_requeue_takes_its_folder_without_a_word(tmp_path):
    held_by(tmp_path, job="41")
    assert claim(tmp_path, this_run({"SLURM_JOB_ID": "41"}), job_state=state_of) == (None, None)


def test_a_live_hpc_train_process_on_this_host_holds_the_folder_until_it_ends(tmp_path):
    me = this_run({})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "hpc_train"])
    try:
        held_by(tmp_path, job=None, host=me.host, pid=other.pid)
        refusal, _ = claim(tmp_path, me)
        assert f"in use by process {other.pid} on {me.host}" in refusal
    finally:
        other.kill()
        other.wait()
    assert not runs_hpc_train(other.pid)
    assert claim(tmp_path, me) == (None, None)  # a local run after a crash: its own folder again
    assert read_owner(tmp_path)["pid"] == me.pid


def test_a_live_process_that_is_not_hpc_train_does_not_hold_it(tmp_path):
    me = this_run({})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held_by(tmp_path, job=None, host=me.host, pid=other.pid)
        assert claim(tmp_path, me)[0] is None  # the number was reused by something else
    finally:
        other.kill()
        other.wait()


def test_an_owner_on_another_host_outside_slurm_cannot_be_checked_and_is_taken_over(tmp_path):
    held_by(tmp_path, job=None, host="node-b", pid=4242)
    me = this_run({"SLURM_JOB_ID": "50"})
    refusal, note = claim(tmp_path, me, process_alive=lambda pid: True)
    assert refusal is None and "taken over from process 4242 on node-b" in note


def test_release_drops_only_this_run_s_claim(tmp_path):
    me = this_run({"SLURM_JOB_ID": "50"})
    claim(tmp_path, me)
    release(tmp_path, replace(me, pid=me.pid + 1))
    assert read_owner(tmp_path) is not None
    release(tmp_path, me)
    assert not (tmp_path / OWNER_FILE).exists()
