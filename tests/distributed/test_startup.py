"""What a run compiles before its first step: nothing on a gloo (CPU) process group, and for
optimizer offload DeepSpeed's CPU Adam, once per build folder, announced while it builds."""

from __future__ import annotations

import pytest

from hpc_train.train.metrics import read_metrics

from .conftest import ok, run_hpc_train

BUILD_LINE = "building DeepSpeed's CPU Adam for optimizer offload (cpu_adam) for this environment, once"


def test_offload_builds_cpu_adam_once_and_trains_like_zero2(zero2_runs, tmp_path, train_args):
    ext = tmp_path / "extensions"  # a fresh build folder: the first build happens here
    env = {"TORCH_EXTENSIONS_DIR": str(ext)}
    offload = ("train.max_steps=4", "train.mode=full", "deepspeed.config=ds_configs/zero3_offload.json")
    first = ok(run_hpc_train("train", *train_args("smolvlm", tmp_path / "a", *offload), env=env))
    assert first.stdout.count(BUILD_LINE) == 1, first.stdout[-3000:]  # local rank 0 only
    assert any((ext / "cpu_adam").glob("*.so"))
    # The shared-memory collective serves tensor-parallel inference only: never built for gloo.
    assert not (ext / "deepspeed_shm_comm").exists()
    again = ok(run_hpc_train("train", *train_args("smolvlm", tmp_path / "b", *offload), env=env))
    assert "building DeepSpeed's" not in again.stdout
    # DeepSpeed's CPU Adam on offloaded fp32 states is the same AdamW as torch's on the ranks.
    losses = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    reference = [r["loss"] for r in read_metrics(zero2_runs["smolvlm"] / "metrics.jsonl") if "loss" in r]
    assert losses == pytest.approx(reference, rel=1e-4)
