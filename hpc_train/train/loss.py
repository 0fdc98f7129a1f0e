"""The loss the optimizer sees, chosen once per run from the config, computed from the logits of
supervised positions only.

The collator lists the positions whose next-token label is supervised
(:mod:`hpc_train.data.loss_positions`); the model's head runs on those alone (transformers'
``logits_to_keep``), so the fp32 logits of media and prompt tokens are never made. The result
equals the model's own loss over every position.

``token``: the mean over every supervised token of the micro-batch (packed rows included: the
same as the samples unpacked together). ``sample`` (packing only): each packed sample's own
token mean, averaged, so short answers weigh as much as long ones.

Under sequence parallelism (a batch carrying :data:`~hpc_train.data.sequence_shard.SHARD`) each
rank's value is its slice's share of the micro-batch's loss — its sums over the whole
micro-batch's counts — so the shares add up over the group to exactly the loss above, and
DeepSpeed's gradient sum over the group is exactly its gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hpc_train.config import DataConfig
from hpc_train.data.loss_positions import LOSS_POSITIONS, LOSS_TARGETS
from hpc_train.data.sequence_shard import SAMPLE_COUNTS, SHARD, SHARD_KEYS
from hpc_train.data.tokenize import IGNORE_INDEX
from hpc_train.models.host_masks import masks_decided_on_host
from hpc_train.models.image_tokens import image_check_made
from hpc_train.models.vision_share import features_for


@dataclass
class Loss:
    """A micro-batch's loss and the logits it came from (the kept positions only)."""

    value: torch.Tensor
    logits: torch.Tensor
    """(rows, K, vocab), at least one position: the loop sends a zero or a NaN gradient through
    them when the loss itself must not be used (a stand-in, a step to skip)."""


LossFn = Callable[[Any, dict[str, Any]], Loss]
"""``loss(model, inputs)``: one forward pass and its loss; ``inputs`` are a batch's
:func:`~hpc_train.data.collate.step_inputs` on the device."""


def supervised_logits(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The logits at the batch's supervised positions, (rows, K, vocab)."""
    forward = {k: v for k, v in inputs.items() if k not in ("labels", LOSS_POSITIONS, LOSS_TARGETS, *SHARD_KEYS)}
    shard = inputs.get(SHARD)
    rows = features_for(shard.feature_rows) if shard is not None else contextlib.nullcontext()
    with masks_decided_on_host(model, forward), image_check_made(model), rows:
        return model(**forward, logits_to_keep=inputs[LOSS_POSITIONS], use_cache=False).logits


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy in fp32, 0 where the target is -100; (rows, K)."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view(targets.shape)


def token_mean_loss(model: Any, inputs: dict[str, Any]) -> Loss:
    logits = supervised_logits(model, inputs)
    targets = inputs[LOSS_TARGETS]
    shard = inputs.get(SHARD)
    if shard is not None:  # 0/0 (NaN) without a supervised token, as the mean below
        return Loss(token_losses(logits, targets).sum() / shard.loss_count, logits)
    value = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX)
    return Loss(value, logits)


def sample_mean_loss(model: Any, inputs: dict[str, Any]) -> Loss:
    logits = supervised_logits(model, inputs)
    shard = inputs.get(SHARD)
    positions = inputs[LOSS_POSITIONS][0] + (shard.offset if shard is not None else 0)
    value = per_sample_mean(token_losses(logits, inputs[LOSS_TARGETS])[0], positions, inputs[LOSS_TARGETS][0],
                            inputs["cu_seq_lens_q"], counts=inputs.get(SAMPLE_COUNTS))
    return Loss(value, logits)


def loss_for(data: DataConfig) -> LossFn:
    """The loss ``data.packing`` / ``data.packing_loss`` ask for."""
    return sample_mean_loss if data.packing and data.packing_loss == "sample" else token_mean_loss


def per_sample_mean(losses: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                    cu_seqlens: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over a packed row's samples of each sample's token-mean loss (samples without a
    supervised token, such as blank media, do not count). ``losses``, ``positions`` (in the
    row), ``targets``: one row's kept positions; ``counts``: each sample's supervised targets
    when these are only a slice of them (sequence parallelism). Nothing here reads the device."""
    supervised = (targets != IGNORE_INDEX).float()
    # Position t predicts label t+1: sample k owns targets cu[k]..cu[k+1]-1, and a prediction
    # never crosses a boundary because each sample's first label is -100.
    segment = torch.bucketize(positions + 1, cu_seqlens[1:].to(positions), right=True)
    count = counts.float() if counts is not None else (
        torch.zeros(len(cu_seqlens) - 1, device=losses.device).index_add_(0, segment, supervised))
    total = torch.zeros_like(count).index_add_(0, segment, losses * supervised)
    present = (count > 0).float()
    return (total / count.clamp(min=1) * present).sum() / present.sum()


def full_logits_loss(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's own token-mean loss over logits of every position (the reference the
    supervised-only loss equals; benchmarks and tests compare the two)."""
    forward = {k: v for k, v in inputs.items() if k not in (LOSS_POSITIONS, LOSS_TARGETS)}
    with masks_decided_on_host(model, forward), image_check_made(model):
        return model(**forward, use_cache=False).loss


__all__ = ["Loss", "LossFn", "full_logits_loss", "loss_for", "per_sample_mean", "sample_mean_loss",
           "supervised_logits", "token_losses", "token_mean_loss"]
