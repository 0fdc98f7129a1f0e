"""launch/mpirun.sh: 2 ranks started by Open MPI, topology from mpi4py, real training."""

from __future__ import annotations

import subprocess

from profiling.report import read_report

from .conftest import ROOT, child_env


def test_mpirun_trains_two_ranks(tmp_path, train_args):
    out = tmp_path / "mpi"
    done = subprocess.run([str(ROOT / "launch" / "mpirun.sh"), "train",
                           *train_args("smolvlm", out, "train.max_steps=3", "eval.generate=false",
                                       "train.collective_timeout_s=77")],
                          env={**child_env(), "NP": "2", "MPIRUN_ARGS": "--report-bindings"}, capture_output=True,
                          text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[mpirun.sh] 2 rank(s) via mpirun (Open MPI)" in done.stdout
    assert "topology: rank 0/2 (local 0/2, node 0/1)" in done.stdout and "from mpi" in done.stdout
    assert "collectives time out after 77 s" in done.stdout  # read back from the process group itself
    # Open MPI binds each of 2 ranks to one core by default (their DataLoader workers would share it)
    said = done.stdout + done.stderr
    assert "Rank 0 is not bound" in said and "Rank 1 is not bound" in said, said[-2000:]
    report = read_report(out / "profile" / "report.json")
    assert [r["rank"] for r in report["per_rank"]] == [0, 1] and report["steps"]["seen"] == 3
