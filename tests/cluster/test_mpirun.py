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
                          env={**child_env(), "NP": "2"}, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[mpirun.sh] 2 rank(s) via mpirun (Open MPI)" in done.stdout
    assert "topology: rank 0/2 (local 0/2, node 0/1)" in done.stdout and "from mpi" in done.stdout
    assert "collectives time out after 77 s" in done.stdout  # read back from the process group itself
    report = read_report(out / "profile" / "report.json")
    assert [r["rank"] for r in report["per_rank"]] == [0, 1] and report["steps"]["seen"] == 3
