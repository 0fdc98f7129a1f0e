"""Bad disks, for real: a read-only folder, a file where a folder should be, a tmpfs that is full
before the run or fills between saves or in the middle of one. Every case is one message with the
path and a fix on every rank, never a traceback, and never a partial checkpoint left behind."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from hpc_train.train.manifest import problems
from tests.filesystems import read_only_dir, remount, small_filesystem, used_bytes_and_inodes

from .conftest import RUN_TIMEOUT_S, hpc_train_cmd, ok, run_hpc_train, start_until

FULL = ("train.mode=full", "eval.generate=false")


def refused(result: subprocess.CompletedProcess, *expected: str) -> None:
    """The ranks stopped with the message (status 2), and no traceback went through our code.
    Under torchrun: the first rank out exits 2 and torchrun itself 1; it sends SIGTERM to ranks
    still exiting then (-15), so any other status means a rank did not agree (a rank left
    waiting in a collective fails with 1)."""
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)
    if codes:
        root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", result.stderr, re.S)
        assert result.returncode == 1 and root and root.group(1) == "2", result.stderr[-3000:]
        assert set(codes) <= {"2", str(-signal.SIGTERM)}, result.stderr[-3000:]
    else:
        assert result.returncode == 2, result.stderr[-3000:]
    assert not re.search(r'File ".*hpc_train/', result.stderr), result.stderr[-3000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("case", ["read_only", "missing_parent_in_read_only", "is_a_file", "parent_is_a_file"])
def test_an_output_dir_that_cannot_be_written_stops_every_rank_before_loading(tmp_path, train_args, case):
    (tmp_path / "file").write_text("not a folder")
    with read_only_dir(tmp_path / "ro") as ro:
        out = {"read_only": ro, "missing_parent_in_read_only": ro / "a" / "b", "is_a_file": tmp_path / "file",
               "parent_is_a_file": tmp_path / "file" / "run"}[case]
        result = run_hpc_train("train", *train_args("smolvlm", out, "train.max_steps=2", *FULL),
                               nproc=2 if case == "read_only" else 1)
    expected = "is a file, not a folder" if "file" in case else "is not writable (Read-only file system"
    refused(result, f"error: output_dir {out}", expected, "Fix: set output_dir")
    assert "Loading weights" not in result.stderr  # refused before minutes of loading


def test_a_disk_without_room_for_one_checkpoint_stops_before_training(tmp_path, train_args):
    with small_filesystem(tmp_path / "disk", "256k") as disk:
        result = run_hpc_train("train", *train_args("smolvlm", disk / "out", "train.max_steps=2", *FULL))
    refused(result, f"not enough free space for one checkpoint in {disk / 'out' / 'checkpoints'}: it needs about",
            "Fix: free space on that filesystem")
    assert "train:" not in result.stderr  # no step was taken


def start_until_checkpoint(cmd: list[str], out: Path, step: int) -> subprocess.Popen:
    latest = out / "checkpoints" / "latest"
    return start_until(cmd, lambda: latest.exists() and latest.read_text().strip() == f"step-{step:08d}",
                       poll_s=0.005, what=f"no checkpoint of step {step}")


def test_a_disk_that_fills_between_saves_stops_every_rank_and_the_run_resumes(tmp_path, train_args):
    with small_filesystem(tmp_path / "disk", "64m") as disk:
        out = disk / "out"
        args = train_args("smolvlm", out, "train.max_steps=12", "train.save_every=4", *FULL)
        proc = start_until_checkpoint(hpc_train_cmd("train", *args), out, 4)
        checkpoint = out / "checkpoints" / "step-00000004"
        size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        used, _ = used_bytes_and_inodes(disk)
        remount(disk, f"size={used + size // 2}")  # someone else's files fill the disk
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)  # stderr comes with stdout
        result = subprocess.CompletedProcess(proc.args, proc.returncode, "", output)
        refused(result, f"not enough free space for checkpoint step-00000008 in {out / 'checkpoints'}",
                f"the newest complete checkpoint, {checkpoint}, is intact")
        assert not (out / "checkpoints" / ".tmp" / "step-00000008").exists()
        assert problems(checkpoint) == []
        remount(disk, "size=64m")  # space freed: the same command goes on from the last checkpoint
        again = ok(run_hpc_train("train", *args))
    assert f"resumed from {checkpoint} at step 4" in again.stdout


def test_a_disk_that_fills_inside_a_save_leaves_no_partial_copy(tmp_path, train_args):
    """Out of inodes (a file-count quota, as on shared filesystems) halfway through DeepSpeed's
    writes: the rank that fails joins the others, all stop with the same message."""
    with small_filesystem(tmp_path / "disk", "64m") as disk:
        out = disk / "out"
        args = train_args("smolvlm", out, "train.max_steps=12", "train.save_every=4", *FULL)
        proc = start_until_checkpoint(hpc_train_cmd("train", *args), out, 4)
        _, inodes = used_bytes_and_inodes(disk)
        remount(disk, f"nr_inodes={inodes + 2}")  # the next save's folder and its first file, no more
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)  # stderr comes with stdout
        result = subprocess.CompletedProcess(proc.args, proc.returncode, "", output)
        staging = out / "checkpoints" / ".tmp" / "step-00000008"
        refused(result, f"error: cannot write {staging} (No space left on device",
                "checkpoint step-00000008 not saved, its partial copy removed; the newest complete checkpoint "
                f"is {out / 'checkpoints' / 'step-00000004'}", "Fix: free space on that filesystem")
        assert not staging.exists()
        assert problems(out / "checkpoints" / "step-00000004") == []
