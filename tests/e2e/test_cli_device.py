"""`hpc-train train` in a job that was given a GPU this machine cannot use (no CUDA here): it
stops before the process group and the model, instead of training on the CPU unnoticed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.distributed.conftest import child_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine cannot make CUDA unusable")
def test_train_in_a_gpu_job_without_working_cuda_stops_at_once(tiny_model_dirs, synthetic_data, tmp_path):
    args = [sys.executable, "-m", "hpc_train", "train", "tiny_smolvlm", f"model.path={tiny_model_dirs['smolvlm']}",
            "model.preset=null", f"data.train={synthetic_data / 'train.jsonl'}", f"output_dir={tmp_path / 'out'}",
            "train.max_steps=1"]
    env = {**child_env(), "CUDA_VISIBLE_DEVICES": "0"}
    stopped = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "error: CUDA_VISIBLE_DEVICES=0, but " in stopped.stderr and "train.device=cpu" in stopped.stderr
    assert "topology:" not in stopped.stdout and not (tmp_path / "out").exists()
