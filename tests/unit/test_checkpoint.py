"""Which checkpoint a resume trusts: manifests, fallback, the RNG file format. (Saving and loading
through DeepSpeed, kills during saves and corrupted files are in tests/distributed.)"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hpc_train.dist import DistInfo
from hpc_train.safe_load import CodeInFile
from hpc_train.train.checkpoint import (
    LATEST,
    Checkpointer,
    CheckpointError,
    _rng_state,
    restore_rng,
    tag_for,
)
from hpc_train.train.manifest import MANIFEST, problems, write_manifest


def make_checkpoint(root, step: int, *, manifest: bool = True):
    folder = root / tag_for(step)
    (folder / "deep").mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(2560.0)}}, folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer": {"exp_avg": torch.ones(77)}}, folder / "deep" / "optim.pt")
    (folder / "trainer_state.json").write_text(f'{{"step": {step}}}')
    if manifest:
        write_manifest(folder, step=step, world_size=1, main=True)
    return folder


def test_a_manifest_catches_truncation_garbage_loss_and_absence(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    assert problems(folder) == []
    model = folder / "mp_rank_00_model_states.pt"
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[:100])
    assert problems(folder) == [f"mp_rank_00_model_states.pt has 100 bytes, the manifest says {size} "
                                "(truncated or overwritten)"]
    folder = make_checkpoint(tmp_path, 6)
    optim = folder / "deep" / "optim.pt"
    optim.write_bytes(bytes(b ^ 1 for b in optim.read_bytes()))  # same size, other bytes
    assert problems(folder) == ["deep/optim.pt does not match its checksum (corrupted)"]
    (folder / "trainer_state.json").unlink()
    assert "trainer_state.json is missing" in problems(folder)
    assert problems(make_checkpoint(tmp_path, 8, manifest=False))[0].startswith("no manifest")
    folder = make_checkpoint(tmp_path, 10)
    (folder / MANIFEST).write_text('{"format": 1, "files": ')
    assert problems(folder)[0].startswith("the manifest cannot be read")


def test_resume_takes_the_newest_checkpoint_that_verifies_and_says_what_it_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    make_checkpoint(root, 2)
    make_checkpoint(root, 4)
    make_checkpoint(root, 6, manifest=False)  # killed before its manifest
    (root / LATEST).write_text(tag_for(4))
    found, notes = Checkpointer(root, DistInfo()).resume_point()
    assert found == root / tag_for(4)
    assert notes[0] == "latest names step-00000004, but step-00000006 is newer (the run stopped before updating latest)"
    assert notes[1].startswith("step-00000006 skipped: no manifest")
    (root / tag_for(4) / "trainer_state.json").write_text("{}")
    found, notes = Checkpointer(root, DistInfo()).resume_point()
    assert found == root / tag_for(2) and "step-00000004 skipped: trainer_state.json has 2 bytes" in notes[-1]
    (root / LATEST).write_text("")
    assert Checkpointer(root, DistInfo()).resume_point()[1][0] == "latest is empty"


def test_checkpoints_that_exist_but_none_verifies_stop_the_run(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / LATEST).write_text(tag_for(4))  # the folder it names is gone
    with pytest.raises(CheckpointError, match="latest names 'step-00000004', which is not there") as caught:
        Checkpointer(root, DistInfo()).resume_point()
    assert "train.resume=false" in str(caught.value)
    make_checkpoint(root, 2, manifest=False)
    with pytest.raises(CheckpointError, match="step-00000002 skipped: no manifest"):
        Checkpointer(root, DistInfo()).resume_point()
    assert Checkpointer(tmp_path / "fresh", DistInfo()).resume_point() == (None, [])


def test_start_cleans_half_saves_and_not_resuming_keeps_the_old_run_aside(tmp_path):
    root = tmp_path / "checkpoints"
    make_checkpoint(root, 2)
    (root / ".tmp" / tag_for(4)).mkdir(parents=True)
    assert Checkpointer(root, DistInfo()).prepare(resume=True) == []
    assert not (root / ".tmp").exists() and (root / tag_for(2)).is_dir()
    said = Checkpointer(root, DistInfo()).prepare(resume=False)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoints.before-")]
    assert len(aside) == 1 and said == [f"train.resume=false: the earlier checkpoints were moved to {aside[0]}"]
    assert problems(aside[0] / tag_for(2)) == [] and not root.exists()


def test_pruning_keeps_the_newest_complete_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        make_checkpoint(root, step)
    make_checkpoint(root, 3, manifest=False)
    make_checkpoint(root, 9, manifest=False)  # newer than the one just written: left for its own fate
    Checkpointer(root, DistInfo(), keep=2)._prune(newest=tag_for(6))
    assert sorted(p.name for p in root.iterdir()) == [tag_for(4), tag_for(6), tag_for(9)]


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(tmp_path / "rng.pt")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_an_rng_file_that_would_run_code_is_refused(tmp_path, capsys):
    torch.save({"python": Payload()}, tmp_path / "rng.pt")
    with pytest.raises(CodeInFile, match=r"rng.pt: refused: reading it would call print "):
        restore_rng(tmp_path / "rng.pt")
    assert "code ran" not in capsys.readouterr().out
