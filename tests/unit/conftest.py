"""In-process runs for the unit tests: a world of one, built by the run's own build step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from hpc_train.config_file import load_config
from hpc_train.dist import init_distributed, read_dist_env
from hpc_train.train.build import build_run
from hpc_train.train.run_parts import RunParts


@pytest.fixture(scope="session")
def world_of_one():
    """One process group for the in-process runs of the session (DeepSpeed keeps the groups it
    made from it, so it cannot end before they do); the environment it sets is put back after."""
    saved = dict(os.environ)
    init_distributed(read_dist_env({}), torch.device("cpu"))  # as a run joins it, its environment too
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def build(world_of_one, tiny_model_dirs, synthetic_data, tmp_path):
    def make(*overrides: str) -> RunParts:
        config = load_config("tiny_smolvlm", [
            f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model_dirs['smolvlm']}", "model.preset=null",
            f"data.train={synthetic_data / 'train.jsonl'}", f"data.eval={synthetic_data / 'eval.jsonl'}",
            "data.num_workers=0", "train.mode=full", "train.micro_batch_size=2", "train.grad_accum=1",
            "eval.max_samples=4", "eval.batch_size=4", "train.save_every=0", "train.eval_every=0", *overrides])
        return build_run(config, read_dist_env({}))

    return make
