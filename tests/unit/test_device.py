"""The rank's device, chosen before the process group: GPU binding for every launcher form the
templates offer, a GPU job whose CUDA does not work, dtypes and the flash-attn guard. This CPU
machine really has no usable CUDA, so the stop is the real one; GPU counts go through
``gpu_index``, the seam ``choose_device`` reads them through."""

from __future__ import annotations

import pytest
import torch

from hpc_train.config_file import load_config
from hpc_train.device import DeviceError, choose_device, gpu_index, native_bf16
from hpc_train.models.varlen_backend import PER_SAMPLE, TORCH_VARLEN, flash_problem, varlen_backend
from hpc_train.topology import DistInfo
from hpc_train.train.trainable_model import compute_dtype

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine cannot make CUDA unusable")


@pytest.mark.parametrize(("form", "local_rank", "local_world", "visible", "expected"), [
    ("torchrun / deepspeed launcher: every GPU of the node to every rank", 3, 4, 4, 3),
    ("srun, one task per GPU, no binding", 1, 2, 2, 1),
    ("srun --gpus-per-task=1 or --gpu-bind=single:1: each task sees its GPU as 0", 3, 4, 1, 0),
    ("more GPUs than ranks (NPROC_PER_NODE below the GPU count)", 1, 2, 8, 1),
    ("one rank, one GPU", 0, 1, 1, 0),
])
def test_each_launcher_form_binds_each_rank_to_a_gpu_of_its_own(form, local_rank, local_world, visible, expected):
    assert gpu_index(local_rank, local_world, visible, {}) == expected, form


def test_fewer_gpus_than_ranks_on_a_node_is_refused_with_the_counts():
    with pytest.raises(DeviceError, match=r"4 ranks on this node, but each sees 2 GPUs \(CUDA_VISIBLE_DEVICES=0,1\)"):
        gpu_index(2, 4, 2, {"CUDA_VISIBLE_DEVICES": "0,1"})


@needs_no_cuda
@pytest.mark.parametrize("env", [{"SLURM_GPUS_ON_NODE": "4"}, {"CUDA_VISIBLE_DEVICES": "0"}, {"SLURM_JOB_GPUS": "0,1"}])
def test_a_job_given_gpus_on_which_cuda_does_not_work_stops_naming_why(env):
    key = next(iter(env))
    with pytest.raises(DeviceError, match=rf"{key}={env[key]}, but .*train on the CPU\. Fix: .*train.device=cpu"):
        choose_device(DistInfo(), "auto", env)


@needs_no_cuda
def test_a_cpu_run_is_chosen_by_a_job_without_gpus_or_on_purpose():
    assert choose_device(DistInfo(), "auto", {"CUDA_VISIBLE_DEVICES": ""}).type == "cpu"
    assert choose_device(DistInfo(), "cpu", {"SLURM_GPUS_ON_NODE": "4"}).type == "cpu"


def test_bf16_only_where_the_gpu_computes_it_natively():
    assert not native_bf16((7, 5)) and not native_bf16((7, 0))  # T4, V100: emulated
    assert native_bf16((8, 0)) and native_bf16((9, 0)) and native_bf16((10, 0))
    cpu = torch.device("cpu")
    assert compute_dtype(load_config(None, ["model.preset=tiny"]), cpu) == torch.float32
    assert compute_dtype(load_config(None, ["model.preset=tiny", "model.dtype=bf16"]), cpu) == torch.bfloat16
    assert compute_dtype(load_config(None, ["model.preset=tiny", "train.device=cpu"])) == torch.float32


def test_flash_attn_is_never_chosen_for_fp32_or_before_ampere():
    assert "fp16 / bf16 only (this run: float32)" in flash_problem(torch.float32, (9, 0))
    assert "sm_80 or newer (this GPU: sm_75)" in flash_problem(torch.bfloat16, (7, 5))
    assert flash_problem(torch.bfloat16, (8, 0)) is None and flash_problem(torch.float16, (9, 0)) is None
    assert varlen_backend(False, torch.bfloat16, None) == PER_SAMPLE
    assert varlen_backend(True, torch.float32, (9, 0)) == PER_SAMPLE
    assert varlen_backend(True, torch.float16, (7, 5)) == PER_SAMPLE


def test_torch_varlen_is_chosen_on_a_gpu_without_flash_attn_unless_attention_has_dropout(monkeypatch):
    monkeypatch.setattr("hpc_train.models.varlen_backend.flash_varlen", lambda: None)  # as where it is absent
    assert varlen_backend(True, torch.bfloat16, (9, 0)) == TORCH_VARLEN
    assert varlen_backend(True, torch.bfloat16, (9, 0), dropout=0.1) == PER_SAMPLE  # its kernel has no dropout


def test_the_flash_attn_import_is_tried_once_per_process():
    from hpc_train.models.varlen_backend import flash_varlen

    flash_varlen.cache_clear()
    first = flash_varlen()
    assert all(flash_varlen() is first for _ in range(3))
    assert flash_varlen.cache_info().misses == 1  # an import that fails is not retried per attention call
