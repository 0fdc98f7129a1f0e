"""The loss over supervised positions only equals the model's own loss over every position:
both families, padded and packed, token mean and per-sample mean, values and gradients."""

from __future__ import annotations

import pytest
import torch

from hpc_train.data.batching.collate import Collator, step_inputs
from hpc_train.data.batching.packing import pack_samples
from hpc_train.data.encoding.loss_positions import LOSS_POSITIONS, LOSS_TARGETS, loss_positions
from hpc_train.data.encoding.tokenize import IGNORE_INDEX
from hpc_train.models.families import get_family
from hpc_train.train.loss import full_logits_loss, sample_mean_loss, token_mean_loss
from tests.conftest import FAMILIES, mixed_samples


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, loaded_tiny, varlen_tiny, synthetic_data):
    family = request.param
    pad = loaded_tiny[family][1].tokenizer.pad_token_id
    return family, varlen_tiny[family], pad, mixed_samples(loaded_tiny, synthetic_data, family)


def loss_and_grads(model: torch.nn.Module, compute) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return float(loss.detach()), grads


def assert_same(full: tuple[float, list[torch.Tensor]], ours: tuple[float, list[torch.Tensor]]) -> None:
    assert ours[0] == pytest.approx(full[0], rel=1e-6)
    scale = max(g.abs().max().item() for g in full[1])
    worst = max((a - b).abs().max().item() for a, b in zip(full[1], ours[1], strict=True))
    assert worst <= 1e-5 * scale, (worst, scale)


def packed(samples, pad: int, family: str) -> dict:
    batch = pack_samples(samples, pad_token_id=pad, family_name=family, pad_to=sum(map(len, samples)) + 7)
    return {**step_inputs(batch), **loss_positions(batch["labels"])}


def test_padded_token_mean_equals_the_full_logits_loss(case):
    family, model, pad, samples = case
    inputs = step_inputs(Collator(get_family(family), pad)(samples))
    full = loss_and_grads(model, lambda: full_logits_loss(model, inputs))
    ours = loss_and_grads(model, lambda: token_mean_loss(model, inputs).value)
    assert_same(full, ours)


def test_packed_token_mean_equals_the_full_logits_loss(case):
    family, model, pad, samples = case
    inputs = packed(samples, pad, family)
    full = loss_and_grads(model, lambda: full_logits_loss(model, inputs))
    ours = loss_and_grads(model, lambda: token_mean_loss(model, inputs).value)
    assert_same(full, ours)


def reference_sample_mean(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Per-sample means from the logits of every position, sample by sample on the host."""
    forward = {k: v for k, v in inputs.items() if k not in ("labels", LOSS_POSITIONS, LOSS_TARGETS)}
    logits = model(**forward, use_cache=False).logits[0].float()
    labels, bounds = inputs["labels"][0], inputs["sample_bounds"]
    means = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        targets = labels[start + 1:end]
        if (targets != IGNORE_INDEX).any():
            means.append(torch.nn.functional.cross_entropy(logits[start:end - 1], targets, ignore_index=IGNORE_INDEX))
    return torch.stack(means).mean()


def test_packed_sample_mean_equals_the_full_logits_per_sample_mean(case):
    family, model, pad, samples = case
    inputs = packed(samples, pad, family)
    full = loss_and_grads(model, lambda: reference_sample_mean(model, inputs))
    ours = loss_and_grads(model, lambda: sample_mean_loss(model, inputs).value)
    assert_same(full, ours)


def test_the_head_sees_only_supervised_positions(case):
    family, model, pad, samples = case
    inputs = step_inputs(Collator(get_family(family), pad)(samples))
    seen: list[torch.Size] = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            logits = token_mean_loss(model, inputs).logits
    finally:
        handle.remove()
    rows, length = inputs["input_ids"].shape
    most = max(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples)
    assert seen == [torch.Size([rows, most, model.config.text_config.hidden_size])]
    assert logits.shape[:2] == (rows, most) and most < length / 4  # media and prompts make no logits


def test_a_batch_without_a_supervised_token_is_nan_as_the_full_loss_is(case):
    family, model, pad, samples = case
    batch = Collator(get_family(family), pad)(samples[:2])
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    inputs = {**step_inputs(batch), "labels": labels, **loss_positions(labels)}
    with torch.no_grad():
        assert torch.isnan(full_logits_loss(model, inputs))
        loss = token_mean_loss(model, inputs)
    assert torch.isnan(loss.value) and loss.logits.shape[1] == 1  # one position kept, so a gradient reaches the weights


def test_loss_positions_pad_short_rows_with_ignored_targets():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9]])
    kept = loss_positions(labels)
    assert kept[LOSS_POSITIONS].tolist() == [[0, 1], [2, 0]]
    assert kept[LOSS_TARGETS].tolist() == [[5, 6], [9, IGNORE_INDEX]]
