"""hpc-train doctor as a user runs it, on situations made for real: an environment with nothing
installed, an output folder nobody can write, a machine without a C++ compiler."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

from tests.filesystems import read_only_dir

ROOT = Path(__file__).resolve().parents[2]


def doctor(*args: str, python: str = sys.executable, env: dict[str, str] | None = None, cwd: Path = ROOT
           ) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "hpc_train", "doctor", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, **(env or {})})


def row(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(name + " "))


def test_a_fresh_venv_with_nothing_installed_is_told_what_to_install(tmp_path):
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    # The source tree on the path, as when someone runs the doctor before installing anything.
    done = doctor(python=str(fresh / "bin" / "python"), env={"PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for name in ("torch", "transformers", "deepspeed", "decord", "mpi4py"):
        assert "FAIL  not installed" in row(done.stdout, name)
    assert "Fix: pip install -c hpc_train/constraints.txt" in row(done.stdout, "torch")  # once, first
    assert "pydantic not installed" in row(done.stdout, "other requirements")
    assert "not checked" in row(done.stdout, "CUDA") and "not checked" in row(done.stdout, "video decoding")
    assert "blocker(s): fix the FAIL rows" in done.stdout


def test_a_read_only_output_dir_blocks(tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        done = doctor("tiny_smolvlm", f"output_dir={ro / 'run'}", "--json", str(tmp_path / "d.json"))
    assert done.returncode == 1, done.stdout + done.stderr
    line = row(done.stdout, "output dir")
    assert "FAIL" in line and "not writable" in line and "Fix: set output_dir" in line
    assert '"blockers": 1' in (tmp_path / "d.json").read_text()


def test_optimizer_offload_without_a_compiler_blocks(tmp_path):
    # Only the venv's own commands: no c++ / g++ on PATH.
    env = {"PATH": str(Path(sys.executable).parent)}
    done = doctor("tiny_smolvlm", "deepspeed.config=ds_configs/zero3_offload.json", f"output_dir={tmp_path}",
                  env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in row(done.stdout, "DeepSpeed ops") and "CPU Adam" in row(done.stdout, "DeepSpeed ops")
    done = doctor("tiny_smolvlm", f"output_dir={tmp_path}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hpc-train doctor: no blockers" in done.stdout


def test_a_bad_config_stops_with_its_own_message():
    done = doctor("tiny_smolvlm", "train.lrr=1")
    assert done.returncode == 2 and "unknown key 'train.lrr'" in done.stderr
