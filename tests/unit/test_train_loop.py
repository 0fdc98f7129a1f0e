"""The training loop in-process: a world of one, the real tiny model, real DeepSpeed and real
checkpoints, built by the run's own build step; the step decisions are driven by the batches
the test hands the loop (the distributed tests cover the same behaviour across ranks)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from hpc_train.data.batching.collate import step_inputs
from hpc_train.data.dataset import Skipped
from hpc_train.data.encoding.loss_positions import loss_positions
from hpc_train.data.encoding.tokenize import IGNORE_INDEX
from hpc_train.train.run_parts import REQUEUE_EXIT_CODE, REQUEUE_MARKER, RunParts
from hpc_train.train.schedule import lr_multiplier
from hpc_train.train.trainer import TrainingStopped, TrainLoop
from profiling.host_reads import HostReads


def batches(parts: RunParts, count: int, *, size: int = 2, start: int = 0) -> list[dict]:
    data = parts.train
    return [data.collate([data.dataset[i] for i in range(k, k + size)]) for k in range(start, start + count * size, size)]


def unsupervised(batch: dict) -> dict:
    """The same batch with no supervised token: the model's mean loss is 0/0 (NaN)."""
    labels = batch["labels"].new_full(batch["labels"].shape, IGNORE_INDEX)
    return {**batch, "labels": labels, **loss_positions(labels), "num_supervised": 0}


def nothing_usable(parts: RunParts) -> dict:
    return parts.train.collate([Skipped(id="x", reason="video file not found", kind="bad_record")])


def loss_of(parts: RunParts, batch: dict) -> float:
    """The loop's loss of ``batch`` with the weights as they are now."""
    with torch.no_grad():
        return float(parts.loss(parts.training.engine, step_inputs(batch)).value)


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


def weights(parts: RunParts) -> list[torch.Tensor]:
    """This rank's copy of every weight (under ZeRO-3, its partition)."""
    return [getattr(p, "ds_tensor", p).detach().clone() for p in parts.training.engine.module.parameters()]


def test_a_non_finite_loss_skips_the_whole_optimizer_step_within_the_allowance(build, capsys):
    parts = build("train.max_steps=2", "train.grad_accum=2", "train.max_bad_steps=1")
    good, bad, *rest = batches(parts, 4)
    expected = loss_of(parts, good)
    assert TrainLoop(parts).train([good, unsupervised(bad), *rest]) == 0
    said = capsys.readouterr().out
    ids = good["sample_ids"] + bad["sample_ids"]  # the whole step's samples are named
    assert f"non-finite loss on samples {ids}; optimizer step skipped on every rank (1/1)" in said
    assert parts.training.state.bad_steps == 1 and parts.training.engine.skipped_steps == 1
    rows = metrics(parts)
    assert [r["skipped_step"] for r in rows] == [1.0, 0.0]
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-6)  # the mean of the step's finite losses
    train = parts.config.train
    planned = train.lr * lr_multiplier(1, total_steps=2, warmup_steps=train.warmup_steps, min_ratio=train.min_lr_ratio)
    assert rows[1]["lr"] == pytest.approx(planned)  # the schedule moved on past the skipped step
    assert rows[1]["loss"] == pytest.approx(loss_of(parts, rest[0]), rel=0.5)  # step 2 trained on


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_skipped_step_leaves_the_weights_as_they_were(build, zero):
    parts = build("train.max_steps=1", "train.max_bad_steps=1", f"deepspeed.config=ds_configs/{zero}.json")
    (bad,) = batches(parts, 1)
    before = weights(parts)
    assert TrainLoop(parts).train([unsupervised(bad)]) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, weights(parts), strict=True))
    assert parts.training.engine.skipped_steps == 1
    assert float(metrics(parts)[0]["grad_norm"]) == float("inf")  # DeepSpeed reports a skipped step so


def test_a_non_finite_loss_past_the_allowance_stops_the_run_naming_its_samples(build):
    parts = build("train.max_steps=1", "train.max_bad_steps=0")
    (bad,) = batches(parts, 1)
    with pytest.raises(TrainingStopped, match=r"non-finite loss on samples .*train.max_bad_steps=0") as stopped:
        TrainLoop(parts).train([unsupervised(bad)])
    assert str(bad["sample_ids"]) in str(stopped.value)
    assert parts.training.state.step == 0


@pytest.mark.parametrize("shape", [[], ["data.packing=true", "data.max_seq_len=256", "train.micro_batch_size=1",
                                           "data.packing_loss=sample"]], ids=["padded", "packed-sample-mean"])
def test_a_micro_batch_with_nothing_usable_adds_nothing_and_its_reason_is_said(build, capsys, shape):
    parts = build("train.max_steps=1", "train.grad_accum=2", *shape)
    (good,) = batches(parts, 1)
    expected = loss_of(parts, good)
    assert TrainLoop(parts).train([nothing_usable(parts), good]) == 0
    said = capsys.readouterr().out
    assert "a micro-batch had no usable sample (['video file not found']); it adds nothing to this step" in said
    (row,) = metrics(parts)
    assert row["skipped_samples"] == 1 and row["empty_micro_batches"] == 1 and row["skipped_step"] == 0.0
    assert row["samples"] == 2 and row["supervised_tokens"] == good["num_supervised"]
    assert row["tokens"] == good["num_real_tokens"]  # the stand-in's tokens are not counted
    assert row["loss"] == pytest.approx(expected, rel=1e-6)  # the stand-in's 0/0 is not averaged in


def test_a_step_with_nothing_usable_anywhere_is_skipped_without_counting_as_bad(build, capsys):
    parts = build("train.max_steps=1")
    before = weights(parts)
    assert TrainLoop(parts).train([nothing_usable(parts)]) == 0
    assert "no rank had a usable sample in this step; optimizer step skipped" in capsys.readouterr().out
    assert parts.training.state.bad_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, weights(parts), strict=True))


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


def reads_by_owner(parts: RunParts, fed: list[dict]) -> dict[str, int]:
    """Device-to-host reads while the loop trains on ``fed`` (collated beforehand, as the
    DataLoader's workers would), by the project whose code made them."""
    with HostReads() as reads:
        assert TrainLoop(parts).train(fed) == 0
    return dict(reads.by_owner()) | {"masks": sum(n for site, n in reads.sites.items() if "masking_utils" in site.file)}


@pytest.mark.parametrize("shape", [[], ["data.packing=true", "data.max_seq_len=256", "train.micro_batch_size=1"],
                                   ["train.logits_tile_mib=0.0025"]], ids=["padded", "packed", "head-in-tiles"])
def test_no_device_read_of_ours_inside_the_accumulation_loop(build, tmp_path, shape):
    """Ours: none per micro-batch, at most two per optimizer step (the step's one collective
    and the gradient norm); transformers' mask checks: none; DeepSpeed's (its tiled loss's
    backward reads the incoming gradient; ours does not): none per micro-batch."""

    def reads(steps: int, accumulation: int) -> dict[str, int]:
        parts = build(*shape, f"output_dir={tmp_path / f'{steps}x{accumulation}'}", f"train.max_steps={steps}",
                      f"train.grad_accum={accumulation}", "train.log_every=1")
        return reads_by_owner(parts, batches(parts, steps * accumulation))

    one, three, longer = reads(1, 2), reads(3, 2), reads(1, 4)
    assert longer["hpc_train"] == one["hpc_train"]  # two more micro-batches, not one more read
    assert (three["hpc_train"] - one["hpc_train"]) / 2 <= 2
    assert one["masks"] == three["masks"] == longer["masks"] == 0
    assert longer.get("deepspeed", 0) == one.get("deepspeed", 0), (one, longer)


def test_an_out_of_memory_stop_says_the_runs_plan_with_the_changes_that_fit(build):
    """The plan of the run on a GPU too small for it (the device's own on a GPU run): its peak
    and the single changes that would fit, each re-planned, then the command."""
    from hpc_train.plan.after_oom import plan_after_oom
    from hpc_train.plan.gpus import Gpu
    from hpc_train.train.trainer import OutOfMemoryStop

    parts = build()
    stop = OutOfMemoryStop(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), parts)
    small = Gpu("tiny-GPU", 0.02, "tiny GPU")
    said = plan_after_oom(stop, small)
    assert said.startswith("Out of memory: CUDA out of memory.")
    assert "plan: " in said and "tiny-GPU" in said and "train.gradient_checkpointing=true" in said
    assert said.endswith(f"hpc-train plan {parts.output / 'config.resolved.yaml'} --gpu auto")
