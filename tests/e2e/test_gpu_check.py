"""The GPU acceptance script runs end to end here (``--cpu``, small sizes), so the first lent GPU
finds a script that works: every part must pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_script_runs_every_part_on_the_cpu(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_check import PARTS

    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("*.log"))
    assert done.returncode == 0, done.stdout + logs
    passed = [line.split()[1].rstrip(":") for line in done.stdout.splitlines() if line.startswith("PASS ")]
    assert passed == list(PARTS), done.stdout
    # A second call in the same folder starts each part over (never resuming an earlier call's
    # checkpoints) and keeps the shared dataset and models.
    left = tmp_path / "work" / "bf16-zero2-run" / "zero2" / "checkpoints"
    assert left.is_dir() and (tmp_path / "shared" / "data" / "train.jsonl").is_file()
    again = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", str(tmp_path), "--only", "doctor-gpu-rows"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHON": sys.executable})
    assert again.returncode == 0 and "PASS doctor-gpu-rows" in again.stdout, again.stdout
    assert left.is_dir()  # another part's folder is left alone
    (tmp_path / "work" / "doctor-gpu-rows" / "stale").write_text("from an earlier call")
    subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", str(tmp_path), "--only", "doctor-gpu-rows"],
                   cwd=ROOT, capture_output=True, timeout=300, env={**os.environ, "PYTHON": sys.executable}, check=True)
    assert not (tmp_path / "work" / "doctor-gpu-rows" / "stale").exists()
    assert (tmp_path / "shared" / "data" / "train.jsonl").is_file()
