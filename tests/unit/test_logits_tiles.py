"""The head and loss in tiles of supervised positions (DeepSpeed's TiledFusedLogitsLoss) give the
loss and gradients of the untiled head: both families, padded and packed, token and sample
mean, trained, frozen and tied heads; one tile's positions reach the head at a time."""

from __future__ import annotations

import copy

import pytest
import torch

from hpc_train.data.batching.collate import Collator, step_inputs
from hpc_train.data.encoding.loss_positions import LOSS_POSITIONS, loss_positions
from hpc_train.data.encoding.tokenize import IGNORE_INDEX
from hpc_train.models.families import get_family
from hpc_train.train.logits_tiles import LOGITS_BYTES, logits_tiles
from hpc_train.train.loss import sample_mean_weights, token_mean_weights, weighted_loss
from tests.unit import test_supervised_loss
from tests.unit.test_supervised_loss import assert_same, loss_and_grads, packed

case = test_supervised_loss.case  # the same fixture: both families' tiny models and mixed samples


def tile_mib(model: torch.nn.Module, positions: int) -> float:
    """A tile size that holds ``positions`` positions' fp32 logits."""
    return positions * model.lm_head.out_features * LOGITS_BYTES / 2**20


def head_inputs(model: torch.nn.Module, compute) -> list[int]:
    """Positions reaching the head's forward per call while ``compute`` runs (the model's own
    call passes the hidden states through, uncounted, when the head is tiled)."""
    seen: list[int] = []
    forward = model.lm_head.forward

    def counting(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(hidden.shape[:-1].numel())
        return forward(hidden)

    model.lm_head.forward = counting
    try:
        compute()
    finally:
        del model.lm_head.forward
    return seen


def test_tile_counts_keep_each_tile_within_the_size():
    assert logits_tiles(100, 1000, 100 * 1000 * 4 / 2**20) == 1
    assert logits_tiles(101, 1000, 100 * 1000 * 4 / 2**20) == 2
    assert logits_tiles(0, 1000, 1.0) == 1
    assert logits_tiles(8192, 49280, 256) == 7  # smolvlm-256m, a fully supervised 8k row


def test_padded_token_mean_in_tiles_equals_the_whole_head(case):
    family, model, pad, samples = case
    inputs = step_inputs(Collator(get_family(family), pad)(samples))
    positions = inputs[LOSS_POSITIONS].numel()
    whole = weighted_loss(token_mean_weights)
    tiled = weighted_loss(token_mean_weights, tile_mib(model, 7))
    expected = loss_and_grads(model, lambda: whole(model, inputs).value)
    got = []
    calls = head_inputs(model, lambda: got.append(loss_and_grads(model, lambda: tiled(model, inputs).value)))
    assert_same(expected, got[0])
    assert sum(calls) == positions and len(calls) == -(-positions // 7) and max(calls) <= 7
    whole_calls = head_inputs(model, lambda: whole(model, inputs))
    assert whole_calls == [positions]


def test_packed_sample_mean_in_tiles_equals_the_whole_head(case):
    family, model, pad, samples = case
    inputs = packed(samples, pad, family)
    whole = weighted_loss(sample_mean_weights)
    tiled = weighted_loss(sample_mean_weights, tile_mib(model, 5))
    assert_same(loss_and_grads(model, lambda: whole(model, inputs).value),
                loss_and_grads(model, lambda: tiled(model, inputs).value))


@pytest.mark.parametrize("head", ["frozen", "tied"])
def test_a_frozen_or_tied_head_in_tiles_equals_the_whole_head(case, head):
    family, model, pad, samples = case
    model = copy.deepcopy(model)
    if head == "frozen":
        model.lm_head.weight.requires_grad_(False)
    else:
        model.lm_head.weight = model.get_input_embeddings().weight
    inputs = step_inputs(Collator(get_family(family), pad)(samples))
    tiled = weighted_loss(token_mean_weights, tile_mib(model, 6))
    assert_same(loss_and_grads(model, lambda: weighted_loss(token_mean_weights)(model, inputs).value),
                loss_and_grads(model, lambda: tiled(model, inputs).value))
    # DeepSpeed reduces a tied head's gradient in the outer backward, once
    assert getattr(model.lm_head.weight, "ds_grad_is_ready", True) is True


def test_a_batch_without_a_supervised_token_is_nan_and_its_zero_gradient_is_finite(case):
    family, model, pad, samples = case
    batch = Collator(get_family(family), pad)(samples[:2])
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    inputs = {**step_inputs(batch), "labels": labels, **loss_positions(labels)}
    model.zero_grad()
    loss = weighted_loss(token_mean_weights, tile_mib(model, 1) / 4)(model, inputs)
    assert torch.isnan(loss.value)
    (loss.logits.float().sum() * 0.0).backward()  # what the loop sends back for a stand-in
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    model.zero_grad()


def test_zero3_keeps_the_head_whole_and_says_so(loaded_tiny):
    from hpc_train.config import TrainConfig
    from hpc_train.train.logits_tiles import describe_tiles, tile_mib_for

    train = TrainConfig(logits_tile_mib=1.0)
    model = loaded_tiny["smolvlm"][0]
    assert [tile_mib_for(train, zero) for zero in (0, 1, 2, 3)] == [1.0, 1.0, 1.0, None]
    per_tile = 2**20 // (model.lm_head.out_features * LOGITS_BYTES)
    assert f"in tiles of {per_tile:,} positions" in describe_tiles(model, train, 2)
    assert "never in tiles under ZeRO-3" in describe_tiles(model, train, 3)
