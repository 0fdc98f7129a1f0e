"""The training loop in-process: a world of one, the real tiny model, real DeepSpeed and real
checkpoints, built by the run's own build step; the step decisions are driven by the batches
the test hands the loop (the distributed tests cover the same behaviour across ranks)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist

from hpc_train.config_file import load_config
from hpc_train.data.dataset import Skipped
from hpc_train.data.tokenize import IGNORE_INDEX
from hpc_train.dist import read_dist_env
from hpc_train.train.build import build_run
from hpc_train.train.run_parts import REQUEUE_EXIT_CODE, REQUEUE_MARKER, RunParts
from hpc_train.train.trainer import TrainingStopped, TrainLoop


@pytest.fixture(scope="module")
def world_of_one():
    """One process group for the module; the environment it sets is put back after."""
    saved = dict(os.environ)
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


def batches(parts: RunParts, count: int, *, size: int = 2, start: int = 0) -> list[dict]:
    data = parts.train
    return [data.collate([data.dataset[i] for i in range(k, k + size)]) for k in range(start, start + count * size, size)]


def unsupervised(batch: dict) -> dict:
    """The same batch with no supervised token: the model's mean loss is 0/0 (NaN)."""
    return {**batch, "labels": batch["labels"].new_full(batch["labels"].shape, IGNORE_INDEX)}


def nothing_usable(parts: RunParts) -> dict:
    return parts.train.collate([Skipped(id="x", reason="video file not found", kind="bad_record")])


def metrics(parts: RunParts) -> list[dict]:
    return [json.loads(line) for line in (parts.output / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_steps_at_deepspeeds_boundary_and_saves_the_last_step(build):
    parts = build("train.max_steps=2", "train.grad_accum=2")
    fed = batches(parts, 4)
    assert TrainLoop(parts).train(fed) == 0
    assert parts.training.state.step == 2
    rows = metrics(parts)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["samples"] for r in rows] == [4, 4]  # two micro-batches of two per step
    assert all(r["tokens"] == sum(b["num_real_tokens"] for b in fed[:2]) for r in rows[:1])
    assert parts.training.checkpointer.latest().name == "step-00000002"


def test_the_dataloader_path_counts_epochs_and_positions(build):
    parts = build("train.max_steps=3")
    assert TrainLoop(parts).train() == 0
    state = parts.training.state
    assert (state.step, state.epoch, state.micro_index) == (3, 0, 3)


def test_a_non_finite_loss_skips_its_micro_batch_within_the_allowance(build, capsys):
    parts = build("train.max_steps=1", "train.max_bad_steps=1")
    good, bad = batches(parts, 2)
    assert TrainLoop(parts).train([unsupervised(bad), good]) == 0
    said = capsys.readouterr().out
    assert f"non-finite loss on samples {bad['sample_ids']}; micro-batch skipped (1/1)" in said
    assert parts.training.state.bad_steps == 1
    assert metrics(parts)[0]["samples"] == 2


def test_a_non_finite_loss_past_the_allowance_stops_the_run_naming_its_samples(build):
    parts = build("train.max_steps=1", "train.max_bad_steps=0")
    (bad,) = batches(parts, 1)
    with pytest.raises(TrainingStopped, match=r"non-finite loss on samples .*train.max_bad_steps=0") as stopped:
        TrainLoop(parts).train([unsupervised(bad)])
    assert str(bad["sample_ids"]) in str(stopped.value)
    assert parts.training.state.step == 0


def test_a_micro_batch_with_nothing_usable_is_skipped_and_its_reason_said(build, capsys):
    parts = build("train.max_steps=1")
    (good,) = batches(parts, 1)
    assert TrainLoop(parts).train([nothing_usable(parts), good]) == 0
    said = capsys.readouterr().out
    assert "a micro-batch had no usable sample (['video file not found']); skipped on every rank" in said
    assert metrics(parts)[0]["skipped_samples"] == 1


def test_a_stop_signal_checkpoints_writes_the_marker_and_asks_for_a_requeue(build):
    parts = build("train.max_steps=5")
    loop = TrainLoop(parts)
    loop.request_stop(signal.SIGTERM)
    assert loop.train(batches(parts, 5)) == REQUEUE_EXIT_CODE
    marker = json.loads((parts.output / REQUEUE_MARKER).read_text())
    assert marker["signal"] == "SIGTERM" and marker["step"] == 1 and marker["exit_code"] == REQUEUE_EXIT_CODE
    assert Path(marker["checkpoint"]) == parts.training.checkpointer.latest()
    assert parts.training.state.step == 1


def test_checkpoints_fall_due_every_save_every_steps_and_the_oldest_go(build):
    parts = build("train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=2")
    assert TrainLoop(parts).train(batches(parts, 3)) == 0
    assert sorted(parts.training.checkpointer.complete_tags()) == ["step-00000002", "step-00000003"]


def test_early_stopping_ends_the_run_when_the_eval_loss_stops_improving(build, capsys):
    # A learning rate of 1e-30: the fp32 weights never change, so the second evaluation is no better than the first.
    parts = build("train.max_steps=5", "train.lr=1e-30", "train.eval_every=1", "train.early_stopping_patience=1")
    assert TrainLoop(parts).train(batches(parts, 5)) == 0
    assert parts.training.state.step == 2
    assert "early stopping at step 2: no better eval loss in 1 evaluations" in capsys.readouterr().out
    evals = [r for r in metrics(parts) if "eval_loss" in r]
    assert len(evals) == 2 and evals[0]["eval_loss"] == evals[1]["eval_loss"]
    assert parts.training.checkpointer.latest().name == "step-00000002"
