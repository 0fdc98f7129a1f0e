"""Checkpoints against real crashes: SIGKILL inside a save, a corrupted newest checkpoint, a
`latest` naming nothing, a finished run started again. 2 ranks, DeepSpeed ZeRO-2 on CPU."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from hpc_train.train.manifest import MANIFEST, problems
from hpc_train.train.metrics import read_metrics

from .conftest import hpc_train_cmd, ok, run_hpc_train, start_until

FULL = ("train.max_steps=4", "train.mode=full", "eval.generate=false")


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_a_kill_inside_a_save_resumes_to_the_uninterrupted_losses(zero2_runs, tmp_path, train_args):
    out = tmp_path / "killed"
    args = train_args("smolvlm", out, *FULL, "train.save_every=1")
    staging = out / "checkpoints" / ".tmp"
    # The save of step 2 or 3 under way (step 1's is complete): kill every process of the run.
    proc = start_until(hpc_train_cmd("train", *args),
                       lambda: any(p.name in ("step-00000002", "step-00000003") for p in staging.glob("step-*")),
                       new_session=True, poll_s=0.002, what="no save of step 2 or 3 began")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = ok(run_hpc_train("train", *args))
    assert "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    assert losses(out) == pytest.approx(losses(zero2_runs["smolvlm"]), rel=1e-5)
    assert not staging.exists() or not any(staging.iterdir())


def test_a_corrupted_checkpoint_is_skipped_for_the_one_before_it(zero2_runs, tmp_path, train_args):
    out = tmp_path / "run"
    args = train_args("smolvlm", out, *FULL, "train.save_every=2")
    first = ok(run_hpc_train("train", *args))
    newest = out / "checkpoints" / "step-00000004"
    # max_steps is a multiple of save_every: the last step is saved once, not again at the end.
    assert first.stdout.count(f"saved checkpoint {newest} ") == 1, first.stdout[-3000:]
    model = newest / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])
    again = ok(run_hpc_train("train", *args))
    assert "checkpoints: step-00000004 skipped: mp_rank_00_model_states.pt has 1000 bytes" in again.stdout
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in again.stdout
    assert losses(out) == pytest.approx(losses(zero2_runs["smolvlm"]), rel=1e-5)
    assert problems(newest) == []  # written again, whole


def test_a_finished_run_started_again_rewrites_nothing(tmp_path, train_args):
    out = tmp_path / "done"
    args = train_args("smolvlm", out, "train.max_steps=2", "train.mode=full", "eval.generate=false")
    ok(run_hpc_train("train", *args, nproc=1))
    outputs = [out / "checkpoints" / "step-00000002" / MANIFEST, out / "profile" / "report.json",
               out / "eval_results.json", out / "model" / "model.safetensors", out / "metrics.jsonl"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs}
    again = ok(run_hpc_train("train", *args, nproc=1))
    assert "resumed from" in again.stdout and "nothing left to do" in again.stdout, again.stdout[-2000:]
    assert "saved checkpoint" not in again.stdout and "eval:" not in again.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs} == before
    # Asked for more steps, the same folder trains on from its last checkpoint.
    more = ok(run_hpc_train("train", *train_args("smolvlm", out, "train.max_steps=3", "train.mode=full",
                                                 "eval.generate=false"), nproc=1))
    assert "resumed from" in more.stdout and "nothing left to do" not in more.stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_a_latest_that_names_nothing_stops_instead_of_starting_over(tmp_path, train_args):
    out = tmp_path / "gone"
    args = train_args("smolvlm", out, "train.max_steps=2", "train.mode=full", "eval.generate=false")
    ok(run_hpc_train("train", *args, nproc=1))
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    before = (out / "metrics.jsonl").read_text()
    stopped = run_hpc_train("train", *args, nproc=1)
    assert stopped.returncode == 2
    assert "no checkpoint can be resumed from (latest names 'step-00000002', which is not there)" in stopped.stderr
    assert "train.resume=false" in stopped.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing trained, nothing overwritten
