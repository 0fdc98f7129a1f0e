"""The output folder's checks and write-failure messages (the real disks: tests/distributed/test_disks.py)."""

from __future__ import annotations

import errno

import pytest
import torch

from hpc_train.train.output_dir import (
    FIX_SPACE,
    FIX_WRITABLE,
    HEADROOM,
    MIB,
    OutputError,
    checkpoint_bytes,
    free_bytes,
    is_write_failure,
    output_problem,
    room_problem,
    write_failure,
)


def test_torch_and_os_write_errors_become_one_message_in_the_os_words(tmp_path):
    torch_error = RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: "
                               "No space left on device")
    assert is_write_failure(torch_error) and is_write_failure(OSError(errno.EROFS, "Read-only file system"))
    message = write_failure(tmp_path / "x.pt", torch_error)
    assert message.startswith(f"cannot write {tmp_path / 'x.pt'} (No space left on device; ")
    assert message.endswith(f"Fix: {FIX_SPACE}")
    assert write_failure(tmp_path, OSError(errno.EROFS, "Read-only file system")).endswith(FIX_WRITABLE)
    # a peer's crash is not ours to explain as a disk problem
    assert not is_write_failure(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))


def test_output_problem_makes_the_folder_or_names_the_file_in_the_way(tmp_path):
    assert output_problem(tmp_path / "a" / "b") is None and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("")
    problem = output_problem(tmp_path / "f" / "run")
    assert problem is not None and f"{tmp_path / 'f'} is a file, not a folder" in problem


def test_room_problem_compares_free_space_with_the_size_asked_for(tmp_path):
    assert room_problem(tmp_path, 1, "one checkpoint") is None
    problem = room_problem(tmp_path / "missing" / "checkpoints", 2**60, "one checkpoint")
    assert problem is not None and "not enough free space for one checkpoint" in problem and "needs about" in problem


def test_a_refusal_inside_the_margin_says_the_margin(tmp_path):
    free = free_bytes(tmp_path)
    need = int(free / (1 + (HEADROOM - 1) / 2))  # fits without the margin, not with it
    problem = room_problem(tmp_path, need, "checkpoint step-00000002")
    assert problem is not None
    assert f"it needs about {need / MIB:.1f} MiB and a 5% margin ({need * HEADROOM / MIB:.1f} MiB in all), " in problem


def test_a_preset_is_written_whole_or_not_at_all_and_a_full_disk_says_so(tmp_path):
    from hpc_train.config_file import load_config
    from hpc_train.dist import DistInfo
    from hpc_train.train.trainable_model import model_source
    from tests.filesystems import remount, small_filesystem

    with small_filesystem(tmp_path / "disk", "256k") as disk:
        config = load_config("tiny_smolvlm", [f"output_dir={disk / 'out'}"])
        (disk / "out").mkdir()
        with pytest.raises(OutputError) as refused:
            model_source(config, DistInfo())
        folder = disk / "out" / "base_model"
        assert str(refused.value).startswith(f"cannot write {folder} (No space left on device; ")
        assert str(refused.value).endswith(f"Fix: {FIX_SPACE} (the tiny preset's weights were not written)")
        assert sorted(p.name for p in (disk / "out").iterdir()) == []  # nothing half-written stays
        (folder).mkdir()
        (folder / "config.json").write_text("{}")  # what an earlier hpc-train left on a full disk
        remount(disk, "size=8m")
        assert model_source(config, DistInfo()) == folder
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_checkpoint_estimate_counts_weights_and_adam_state_of_the_trainable_ones():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10).to(torch.bfloat16))
    model[1].requires_grad_(False)
    assert checkpoint_bytes(model) == 110 * 4 + 110 * 2 + 12 * 110
