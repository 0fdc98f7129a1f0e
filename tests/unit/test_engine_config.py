"""DeepSpeed config resolution, the LR schedule, the data plan and evaluation helpers."""

from __future__ import annotations

import json
import math

import pytest

from hpc_train.config_file import load_config
from hpc_train.dist import DistInfo
from hpc_train.errors import ConfigError
from hpc_train.evaluation.metrics import normalize_answer
from hpc_train.train.data_order import (
    PlannedBatches,
    rank_micro_batches,
    steps_per_epoch,
    total_steps,
)
from hpc_train.train.engine import resolve_ds_config, zero_stage
from hpc_train.train.evaluate import shard
from hpc_train.train.schedule import lr_multiplier


def cfg(*overrides: str):
    return load_config("tiny_smolvlm", list(overrides))


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_shipped_configs_resolve_without_auto(name):
    ds = resolve_ds_config(cfg(f"deepspeed.config=ds_configs/{name}.json", "train.grad_accum=3",
                               "train.micro_batch_size=2"), 4, bf16=True, hidden_size=64)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    assert zero_stage(ds) == int(name[4])


def write_ds(tmp_path, body: dict):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    return path


def test_optimizer_block_is_refused_not_silently_used(tmp_path):
    path = write_ds(tmp_path, {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}})
    with pytest.raises(ConfigError, match=r"ds.json: has an 'optimizer' block.*per-group learning rates"):
        resolve_ds_config(cfg(f"deepspeed.config={path}"), 2, bf16=False, hidden_size=64)
    path = write_ds(tmp_path, {"scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ConfigError, match="'scheduler' block"):
        resolve_ds_config(cfg(f"deepspeed.config={path}"), 2, bf16=False, hidden_size=64)


def test_batch_size_inconsistency_is_explained(tmp_path):
    path = write_ds(tmp_path, {"train_batch_size": 32, "zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigError, match=r"train_batch_size=32 but micro_batch \(8\) x grad_accum \(1\) x world_size \(2\) = 16"):
        resolve_ds_config(cfg(f"deepspeed.config={path}"), 2, bf16=False, hidden_size=64)
    path = write_ds(tmp_path, {"train_micro_batch_size_per_gpu": 4})
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 disagrees with the run's value 8"):
        resolve_ds_config(cfg(f"deepspeed.config={path}"), 2, bf16=False, hidden_size=64)


def test_unknown_auto_and_missing_file_are_explained(tmp_path):
    path = write_ds(tmp_path, {"zero_optimization": {"stage": 2, "sub_group_size": "auto"}})
    with pytest.raises(ConfigError, match=r"no value is known for zero_optimization.sub_group_size"):
        resolve_ds_config(cfg(f"deepspeed.config={path}"), 1, bf16=False, hidden_size=64)
    with pytest.raises(ConfigError, match=r"no such file.*zero2.json"):
        resolve_ds_config(cfg("deepspeed.config=nope.json"), 1, bf16=False, hidden_size=64)


def test_schedule_warmup_then_cosine_to_floor():
    kw = {"total_steps": 100, "warmup_steps": 10, "min_ratio": 0.1}
    assert lr_multiplier(0, **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, **kw) == pytest.approx(1.0)
    assert lr_multiplier(10, **kw) == pytest.approx(1.0)
    assert lr_multiplier(55, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, **kw) == pytest.approx(0.1)
    values = [lr_multiplier(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(("n", "micro", "world", "accum"), [(100, 4, 2, 3), (37, 2, 3, 1), (64, 8, 1, 2)])
def test_plan_is_a_sharded_permutation_with_exact_steps(n, micro, world, accum):
    for epoch in (0, 1):
        per_rank = [rank_micro_batches(n, epoch=epoch, seed=5, rank=r, world_size=world, micro_batch=micro,
                                       grad_accum=accum) for r in range(world)]
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(seen) == len(set(seen))  # no sample twice in an epoch, no rank overlap
        assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of micro-batches
        assert len(per_rank[0]) == steps_per_epoch(n, micro_batch=micro, world_size=world, grad_accum=accum) * accum
    a = rank_micro_batches(n, epoch=0, seed=5, rank=0, world_size=world, micro_batch=micro, grad_accum=accum)
    b = rank_micro_batches(n, epoch=1, seed=5, rank=0, world_size=world, micro_batch=micro, grad_accum=accum)
    assert a != b  # reshuffled per epoch


def test_total_steps_and_too_small_dataset():
    assert total_steps(100, micro_batch=4, world_size=2, grad_accum=3, epochs=2.5, max_steps=None) == 10
    assert total_steps(100, micro_batch=4, world_size=2, grad_accum=3, epochs=1, max_steps=7) == 7
    with pytest.raises(ConfigError, match="fewer than one optimizer step needs"):
        total_steps(5, micro_batch=4, world_size=2, grad_accum=1, epochs=1, max_steps=None)


def test_planned_batches_resume_mid_epoch():
    planned = PlannedBatches(40, seed=1, rank=1, world_size=2, micro_batch=4, grad_accum=1)
    full = list(planned)
    planned.position = (0, 3)
    assert list(planned) == full[3:] and len(planned) == len(full) - 3


def test_shard_gives_equal_shares_and_flags_repeats():
    shares = [shard(10, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert {len(s) for s in shares} == {4}
    counted = sorted(i for s in shares for i, keep in s if keep)
    assert counted == list(range(10))


@pytest.mark.parametrize(("a", "b"), [("Red.", "red"), ("  the   BALL is red!", "the ball is red"),
                                      ("high", "High")])
def test_answers_normalised_for_exact_match(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_different_answers_stay_different():
    assert normalize_answer("red") != normalize_answer("reddish")


@pytest.mark.parametrize(("block", "named"), [
    ({}, "ZeRO stage 0"),
    ({"zero_optimization": {"stage": 0}}, "ZeRO stage 0"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "compute_grad_norm=false"),
    ({"zero_optimization": {"stage": 3}, "bf16": {"check_grad_overflow": False}}, "check_grad_overflow=false"),
])
def test_configs_that_would_apply_a_non_finite_step_are_refused(tmp_path, block, named):
    path = write_ds(tmp_path, block)
    with pytest.raises(ConfigError, match=f"{named}.*would be applied to the weights.*Fix: use ZeRO stage 1, 2 or 3"):
        resolve_ds_config(cfg(f"deepspeed.config={path}"), 1, bf16=False, hidden_size=64)
