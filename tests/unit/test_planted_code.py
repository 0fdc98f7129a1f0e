"""A file planted where a run reads weights back — any file of a checkpoint, the base model's or an
adapter's ``.bin`` weights — is a pickle that would run a shell command while it is read. Each is
read back for real (the run's own build step, real DeepSpeed, transformers and PEFT); none runs
the command: a checkpoint is skipped for the one before it with a message, a model folder stops
the run naming the file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpc_train.errors import HpcTrainError
from hpc_train.safe_load import CodeInFile, load_data, weights_only_loads
from hpc_train.train.checkpoint import CheckpointError, tag_for
from hpc_train.train.manifest import problems, write_manifest
from hpc_train.train.trainer import TrainLoop


class Payload:
    """What the probe planted: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Rewrite ``path`` as the real file plus the payload (its manifest redone, as anyone who can
    write the folder can)."""
    state = torch.load(path, weights_only=False, map_location="cpu")  # our own file, just written
    torch.save({**state, "note": Payload(marker)}, path)
    folder = next(p for p in path.parents if p.name.startswith("step-"))
    write_manifest(folder, step=int(folder.name.split("-")[1]), world_size=1, main=True)
    assert problems(folder) != []  # the manifest is right; the pickle is what fails it


def test_a_payload_is_refused_whatever_the_caller_passes(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "note": Payload(marker)}, tmp_path / "x.pt")
    with pytest.raises(CodeInFile, match=r"x.pt: refused: reading it would call posix.system \(weights files"):
        load_data(tmp_path / "x.pt")
    with weights_only_loads(), pytest.raises(CodeInFile):
        torch.load(tmp_path / "x.pt", weights_only=False)  # as DeepSpeed's loader asks
    assert torch.load is torch.serialization.load  # put back after
    assert not marker.exists()


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "rng_rank0.pt"])
def test_a_checkpoint_file_that_would_run_code_is_skipped_for_the_checkpoint_before_it(build, tmp_path, capsys,
                                                                                       name):
    marker = tmp_path / "ran"
    first = build("train.max_steps=2", "train.save_every=1", "train.mode=lora")
    assert TrainLoop(first).train() == 0
    newest = first.output / "checkpoints" / tag_for(2)
    plant(newest / name, marker)
    capsys.readouterr()
    again = build("train.max_steps=3", "train.save_every=1", "train.mode=lora")
    said = capsys.readouterr().out
    assert (f"checkpoints: {tag_for(2)} skipped: {name} refused: reading it would call posix.system (weights "
            "files may hold data, never code)") in said
    assert f"resumed from {first.output / 'checkpoints' / tag_for(1)} at step 1" in said
    assert TrainLoop(again).train() == 0 and again.training.state.step == 3
    assert not marker.exists()


def test_a_file_swapped_in_after_the_check_is_refused_by_the_load_itself(build, tmp_path):
    marker = tmp_path / "ran"
    parts = build("train.max_steps=1", "train.save_every=1", "deepspeed.config=ds_configs/zero3.json")
    assert TrainLoop(parts).train() == 0
    saved = parts.output / "checkpoints" / tag_for(1)
    plant(next(saved.glob("*optim_states.pt")), marker)
    with pytest.raises(CheckpointError, match=r"optim_states.pt: refused: reading it would call posix.system .*"
                                              r"Fix: remove .*step-00000001"):
        parts.training.checkpointer.load(parts.training.engine, saved)
    assert not marker.exists()


@pytest.fixture
def planted_model(tiny_model_dirs, tmp_path) -> tuple[Path, Path]:
    """The tiny model with its weights as ``pytorch_model.bin`` carrying the payload."""
    folder, marker = tmp_path / "model", tmp_path / "ran"
    shutil.copytree(tiny_model_dirs["smolvlm"], folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "note": Payload(marker)}, folder / "pytorch_model.bin")
    return folder, marker


def test_base_model_weights_that_would_run_code_stop_the_run_naming_the_file(build, planted_model):
    folder, marker = planted_model
    with pytest.raises(HpcTrainError, match=rf"{folder}/pytorch_model.bin: refused: reading it would call "
                                            r"posix.system .*Fix: use a copy of model.path from a source you trust"):
        build(f"model.path={folder}")
    assert not marker.exists()


def test_adapter_weights_that_would_run_code_stop_the_run_naming_the_file(build, tiny_model_dirs, tmp_path):
    lora = build("train.mode=lora", "train.max_steps=1")
    adapter, marker = tmp_path / "adapter", tmp_path / "ran"
    lora.training.engine.module.save_pretrained(adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({**weights, "note": Payload(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(HpcTrainError, match=r"adapter_model.bin: refused: reading it would call posix.system .*"
                                            r"Fix: use a copy of model.adapter"):
        build("train.mode=lora", f"model.adapter={adapter}", "output_dir=" + str(tmp_path / "second"))
    assert not marker.exists()
