"""hpc-train doctor's checks, each given the situation it judges (this machine's real packages,
an environment a scheduler would set, a GPU as torch would describe it)."""

from __future__ import annotations

import pytest

from hpc_train.device import cuda_unusable_reason, gpus_allocated
from hpc_train.doctor import RunNeeds, blockers, format_table, run_checks
from hpc_train.doctor.accelerator import Gpu, cuda_check, gpu_checks, varlen_check
from hpc_train.doctor.machine import output_checks, slurm_job_check
from hpc_train.doctor.packages import package_check, package_checks, requirements
from hpc_train.pins import Pins, drift, read_pins

H100 = Gpu("NVIDIA H100 80GB HBM3", 79.6, (9, 0), True)


def test_pins_cover_every_requirement_at_a_version_inside_its_range():
    pins = read_pins()
    assert pins.python and pins.python.startswith("3.")
    needed = requirements()
    assert {"torch", "transformers", "deepspeed", "peft", "bitsandbytes", "decord"} <= set(needed)
    for name, spec in needed.items():
        row = package_check(name, spec, pins)
        assert row.status != "fail", row


def test_this_environment_is_the_pinned_one():
    """The suite runs in the environment the README's install line makes: no drift at all."""
    pins = read_pins()
    assert drift(pins, list(requirements())) == {}
    rows = {c.name: c for c in package_checks(pins)}
    assert rows["torch"].status == "ok" and rows["torch"].note == "as tested"


def test_drift_and_out_of_range_are_named_per_package():
    pins = Pins({"torch": "0.0.1", "pyyaml": "0.0.2"}, "3.11.7")
    torch_row = package_check("torch", ">=2.14,<3", pins)
    assert torch_row.status == "warn" and torch_row.note == "drift: tested 0.0.1"
    assert package_check("torch", ">=99", pins).status == "fail"
    missing = package_check("no-such-package-hpc", "", pins)
    assert missing.status == "fail" and missing.found == "not installed"
    assert set(drift(pins)) == {"torch", "pyyaml"}


def test_a_gpu_without_a_datasheet_peak_is_named_and_does_not_block():
    unknown = Gpu("NVIDIA Quantum X1", 96.0, (10, 0), True)
    rows = gpu_checks([unknown])
    assert rows[0].status == "warn" and "'NVIDIA Quantum X1'" in rows[0].note and "unknown" in rows[0].note
    assert not blockers(rows)


def test_gpus_of_one_kind_share_a_row_and_bf16_follows_the_oldest():
    rows = gpu_checks([H100] * 4)
    assert [r.name for r in rows] == ["GPU 0-3", "compute dtype"]
    assert "989.4 TFLOP/s" in rows[0].note and rows[1].found == "bf16"
    v100 = Gpu("Tesla V100-SXM2-32GB", 31.7, (7, 0), False)
    rows = gpu_checks([H100, v100])
    assert [r.name for r in rows] == ["GPU 0", "GPU 1", "compute dtype"]
    assert rows[-1].status == "warn" and rows[-1].found == "fp32"


def test_gpus_given_but_cuda_unusable_blocks_unless_the_run_asks_for_the_cpu():
    import torch

    env = {"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert gpus_allocated(env) == "SLURM_GPUS_ON_NODE=2"
    assert gpus_allocated({"CUDA_VISIBLE_DEVICES": ""}) is None
    row = cuda_check(torch, env)
    if torch.cuda.is_available():  # a GPU machine: the situation cannot be made here
        assert row.status == "ok"
    else:
        assert row.status == "fail" and "SLURM_GPUS_ON_NODE=2" in row.note and "train on the CPU" in row.note
        assert "train.device=cpu" in row.note
        assert cuda_check(torch, env, cpu_run=True).status == "info"
        assert cuda_check(torch, {}).status == "info"
    assert ">= 580" in cuda_unusable_reason("13.0", "550.54.15")
    assert "CPU-only" in cuda_unusable_reason(None, None)


def test_slurm_allocation_is_described():
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "hpc-lora", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "16",
           "SLURM_GPUS_ON_NODE": "4"}
    row = slurm_job_check(env)
    assert row.found == "job 42 (hpc-lora)"
    assert "2 node(s) gpu[01-02]" in row.note and "16 CPU(s) per task" in row.note and "GPUs on this node: 4" in row.note
    assert slurm_job_check({}) is None


def test_free_disk_below_the_minimum_blocks(tmp_path):
    rows = {c.name: c for c in output_checks(tmp_path / "new" / "run", min_free_gib=1e9, warn_free_gib=2e9)}
    assert rows["output dir"].status == "ok" and "to be made in" in rows["output dir"].found
    assert rows["free disk"].status == "fail"
    (tmp_path / "file").write_text("x")
    assert output_checks(tmp_path / "file" / "run", min_free_gib=0, warn_free_gib=0)[0].status == "fail"


def test_the_whole_table_on_this_machine_has_no_blocker(tmp_path):
    checks = run_checks(RunNeeds(tmp_path), min_free_gib=0.01, warn_free_gib=0.01)
    names = [c.name for c in checks]
    for expected in ("python", "torch", "transformers", "CUDA", "NCCL", "compute dtype", "packing attention",
                     "bitsandbytes (QLoRA)", "DeepSpeed ops", "video decoding", "video backend", "audio loading", "mpirun",
                     "SLURM", "output dir", "free disk"):
        assert expected in names
    assert not blockers(checks), format_table(checks)
    assert "hpc-train doctor: no blockers" in format_table(checks)


def test_packing_attention_row_names_the_kernel_and_why_flash_is_not_used(monkeypatch):
    monkeypatch.setattr("hpc_train.models.varlen_backend.flash_varlen", lambda: None)  # as where it is absent
    t4 = Gpu("Tesla T4", 14.6, (7, 5), False)
    assert varlen_check([]).found == "per-sample SDPA"
    # without flash-attn, PyTorch's own varlen kernel (it ships with torch) serves a bf16 GPU
    h100 = varlen_check([H100])
    assert h100.found == "torch varlen" and h100.status == "ok"
    old = varlen_check([t4])  # no bf16 on a T4: the run computes in fp32
    assert old.found == "per-sample SDPA" and "fp16 / bf16 only (this run: float32)" in old.note
    assert "stays exact" in old.note


def test_a_processor_dependency_missing_for_the_configured_model_blocks(monkeypatch, tiny_model_dirs):
    """SmolVLM2's processor imports num2words when it is made. Without the package transformers
    sets its ``num2words`` to None at import, which is what is set here (this environment has it)."""
    from transformers.models.smolvlm import processing_smolvlm

    from hpc_train.config import ModelConfig
    from hpc_train.doctor.runtime import processor_checks

    model = ModelConfig(path=str(tiny_model_dirs["smolvlm2"]))
    [fine] = processor_checks(model)
    assert (fine.status, fine.found) == ("ok", "SmolVLMProcessor loads")
    monkeypatch.setattr(processing_smolvlm, "num2words", None)
    [row] = processor_checks(model)
    assert row.status == "fail" and "pip install -c hpc_train/constraints.txt num2words" in row.note
    assert blockers([row]) == [row]
    assert processor_checks(ModelConfig(family="smolvlm", preset="tiny"))[0].status == "ok"
    [absent] = processor_checks(ModelConfig(path="/nowhere/SmolVLM2"))
    assert absent.status == "warn" and "no config.json there" in absent.note


def test_a_run_without_the_processor_s_package_stops_with_the_install_fix(monkeypatch, tiny_model_dirs):
    from transformers.models.smolvlm import processing_smolvlm

    from hpc_train.config import ModelConfig
    from hpc_train.models.load import MissingPackage, load_processor

    monkeypatch.setattr(processing_smolvlm, "num2words", None)  # as transformers sets it without the package
    with pytest.raises(MissingPackage, match="needs a package that is not installed here.*num2words.*Fix: pip install "
                                             "-c hpc_train/constraints.txt -e ."):
        load_processor(ModelConfig(path=str(tiny_model_dirs["smolvlm2"])))
