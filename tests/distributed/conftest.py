"""Helpers for real multi-process runs (torchrun + DeepSpeed on CPU, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

FAMILIES = ("smolvlm", "smolvlm2", "llava_onevision", "llava_onevision_1_5")
ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 420  # a hang (e.g. ranks running different modules under ZeRO-3) fails here


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return env


def hpc_train_cmd(command: str, *args: str, nproc: int = 2) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if nproc == 1:
        launcher = [sys.executable]
    return [*launcher, "-m", "hpc_train", command, *args]


def run_hpc_train(command: str, *args: str, nproc: int = 2, timeout: float = RUN_TIMEOUT_S,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(hpc_train_cmd(command, *args, nproc=nproc), env={**child_env(), **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"hpc-train {command} did not finish in {timeout} s (hang?)\n"
                             f"{(exc.stderr or b'')[-4000:]}") from exc


def start_until(cmd: list[str], until: Callable[[], bool], *, env: dict[str, str] | None = None,
                new_session: bool = False, poll_s: float = 0.2, what: str = "the run never got there"
                ) -> subprocess.Popen:
    """A run started, returned once ``until()`` holds; its output (stdout and stderr together) is
    shown when it ends first. ``new_session``: its pid is its process group (to kill it whole)."""
    proc = subprocess.Popen(cmd, env={**child_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=new_session, cwd=ROOT)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not until():
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, what
        time.sleep(poll_s)
    return proc


def logged_steps(out: Path, steps: int) -> Callable[[], bool]:
    """Whether the run writing ``out`` has logged ``steps`` rows of metrics."""
    from hpc_train.train.metrics import read_metrics

    metrics = out / "metrics.jsonl"
    return lambda: metrics.exists() and len(read_metrics(metrics)) >= steps


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-6000:]
    return result


@pytest.fixture(scope="session")
def train_args(tiny_model_dirs, synthetic_data):
    """Overrides that point a tiny recipe at the session's saved model and data."""

    def make(family: str, out: Path, *extra: str) -> list[str]:
        return [f"tiny_{family}", f"output_dir={out}", f"model.path={tiny_model_dirs[family]}", "model.preset=null",
                f"data.train={synthetic_data / 'train.jsonl'}", f"data.eval={synthetic_data / 'eval.jsonl'}",
                "data.num_workers=0",
                "train.micro_batch_size=4", "eval.max_samples=8", "eval.batch_size=4", *extra]

    return make


@pytest.fixture(scope="session")
def zero2_runs(tmp_path_factory, train_args):
    """Full fine-tunes on 2 ranks under ZeRO-2 for every family, 4 steps each."""
    runs = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(f"z2_{family}")
        ok(run_hpc_train("train", *train_args(family, out, "train.max_steps=4", "train.mode=full")))
        runs[family] = out
    return runs
