"""The loss the optimizer sees, chosen once per run from the config, computed from the logits of
supervised positions only.

The collator lists the positions whose next-token label is supervised
(:mod:`hpc_train.data.encoding.loss_positions`); the model's head runs on those alone (transformers'
``logits_to_keep``), so the fp32 logits of media and prompt tokens are never made. The result
equals the model's own loss over every position.

``token``: the mean over every supervised token of the micro-batch (packed rows included: the
same as the samples unpacked together). ``sample`` (packing only): each packed sample's own
token mean, averaged, so short answers weigh as much as long ones.

Under sequence parallelism (a batch carrying :data:`~hpc_train.data.batching.sequence_shard.SHARD`) each
rank's value is its slice's share of the micro-batch's loss — its sums over the whole
micro-batch's counts — so the shares add up over the group to exactly the loss above, and
DeepSpeed's gradient sum over the group is exactly its gradient.

Every loss is a weighted sum of the kept positions' cross-entropies (the weights decided from
the targets, never read back to the host), so the same loss can run its head and loss over
tiles of those positions (:mod:`hpc_train.train.logits_tiles`) when their fp32 logits are
large; the run does once they pass ``train.logits_tile_mib``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hpc_train.config import DataConfig, TrainConfig
from hpc_train.data.batching.sequence_shard import SAMPLE_COUNTS, SHARD, SHARD_KEYS
from hpc_train.data.caches.feature_writer import store_computed
from hpc_train.data.caches.vision_cache import VISION_FEATURES
from hpc_train.data.encoding.loss_positions import LOSS_POSITIONS, LOSS_TARGETS
from hpc_train.data.encoding.tokenize import IGNORE_INDEX
from hpc_train.models.cached_vision import CachedFeatures, cached_features_for
from hpc_train.models.host_masks import masks_decided_on_host
from hpc_train.models.image_tokens import image_check_made
from hpc_train.models.vision_share import features_for
from hpc_train.train.logits_tiles import (
    head_passed_through,
    logits_tiles,
    output_head,
    tied_to_inputs,
    tile_mib_for,
    tiled_weighted_loss,
)


@dataclass
class Loss:
    """A micro-batch's loss and the logits it came from (the kept positions only)."""

    value: torch.Tensor
    logits: torch.Tensor
    """(rows, K, vocab), at least one position: the loop sends a zero or a NaN gradient through
    them when the loss itself must not be used (a stand-in, a step to skip). When the head ran
    in tiles, its input (rows, K, hidden), which serves the same way."""


LossFn = Callable[[Any, dict[str, Any]], Loss]
"""``loss(model, inputs)``: one forward pass and its loss; ``inputs`` are a batch's
:func:`~hpc_train.data.batching.collate.step_inputs` on the device."""


def supervised_logits(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The logits at the batch's supervised positions, (rows, K, vocab)."""
    with _forward_context(model, inputs) as forward:
        return model(**forward, logits_to_keep=inputs[LOSS_POSITIONS], use_cache=False).logits


@contextlib.contextmanager
def _forward_context(model: Any, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    forward = {k: v for k, v in inputs.items()
               if k not in ("labels", LOSS_POSITIONS, LOSS_TARGETS, VISION_FEATURES, *SHARD_KEYS)}
    shard = inputs.get(SHARD)
    rows = features_for(shard.feature_rows) if shard is not None else contextlib.nullcontext()
    cached = inputs.get(VISION_FEATURES)
    with masks_decided_on_host(model, forward), image_check_made(model), rows, _cached(cached):
        yield forward
    if cached is not None:
        store_computed(cached)


def _cached(features: CachedFeatures | None) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext() if features is None else cached_features_for(features)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy in fp32, 0 where the target is -100; (rows, K)."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view(targets.shape)


Weights = Callable[[dict[str, Any]], tuple[torch.Tensor, "torch.Tensor | bool"]]
"""``weights(inputs)``: each kept position's weight in the loss, (rows, K), finite, and whether
the loss is undefined (nothing supervised: NaN, as a mean over nothing). The loss is
``sum(weights * token_losses)``."""


def token_mean_weights(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | bool]:
    """Each supervised token weighs 1 / the micro-batch's supervised tokens (over the whole group
    under sequence parallelism, so the ranks' shares add up to the mean)."""
    supervised = (inputs[LOSS_TARGETS] != IGNORE_INDEX).float()
    shard = inputs.get(SHARD)
    if shard is not None:  # the count is known on the host
        return supervised / max(shard.loss_count, 1), shard.loss_count == 0
    count = supervised.sum()
    return supervised / count.clamp(min=1), count == 0


def sample_mean_weights(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed sample's supervised tokens share 1 / the samples with a supervised token."""
    shard = inputs.get(SHARD)
    positions = inputs[LOSS_POSITIONS][0] + (shard.offset if shard is not None else 0)
    weights, empty = per_sample_weights(positions, inputs[LOSS_TARGETS][0], inputs["cu_seq_lens_q"],
                                        counts=inputs.get(SAMPLE_COUNTS))
    return weights.unsqueeze(0), empty


def per_sample_weights(positions: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor,
                       counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights that make a packed row's loss the mean over its samples of each sample's
    token-mean loss (samples without a supervised token, such as blank media, do not count).
    ``positions`` (in the row), ``targets``: one row's kept positions; ``counts``: each sample's
    supervised targets when these are only a slice of them (sequence parallelism). Nothing here
    reads the device."""
    supervised = (targets != IGNORE_INDEX).float()
    # Position t predicts label t+1: sample k owns targets cu[k]..cu[k+1]-1, and a prediction
    # never crosses a boundary because each sample's first label is -100.
    segment = torch.bucketize(positions + 1, cu_seqlens[1:].to(positions), right=True)
    count = counts.float() if counts is not None else (
        torch.zeros(len(cu_seqlens) - 1, device=targets.device).index_add_(0, segment, supervised))
    present = (count > 0).float()
    samples = present.sum()
    return supervised * (present / count.clamp(min=1))[segment] / samples.clamp(min=1), samples == 0


def per_sample_mean(losses: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                    cu_seqlens: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over a packed row's samples of each sample's token-mean loss (NaN without a
    supervised sample); arguments as :func:`per_sample_weights`, ``losses`` the positions' own."""
    weights, empty = per_sample_weights(positions, targets, cu_seqlens, counts)
    return _undefined_where(empty, (losses * weights).sum())


def weighted_loss(weights: Weights, tile_mib: float | None = None, backward_scale: float = 1.0) -> LossFn:
    """The loss ``sum(weights * token_losses)`` of one forward pass, its head and loss in tiles of
    supervised positions when their fp32 logits would pass ``tile_mib`` (``None``: never).
    ``backward_scale``: what the loop's backward multiplies the loss by (DeepSpeed's 1 / grad_accum,
    the sequence-parallel share scale); the tiles take the head's own gradient inside the forward,
    which that backward never reaches, so they take it at that scale."""

    def loss(model: Any, inputs: dict[str, Any]) -> Loss:
        positions = inputs[LOSS_POSITIONS]
        head = output_head(model) if tile_mib is not None else None
        tiles = logits_tiles(positions.numel(), head.out_features, tile_mib) if head is not None else 1
        weight, empty = weights(inputs)
        if tiles == 1:
            logits = supervised_logits(model, inputs)
            return Loss(_undefined_where(empty, (token_losses(logits, inputs[LOSS_TARGETS]) * weight).sum()), logits)
        with _forward_context(model, inputs) as forward, head_passed_through(head):
            hidden = model(**forward, logits_to_keep=positions, use_cache=False).logits
        scaled = tiled_weighted_loss(head, hidden, inputs[LOSS_TARGETS], weight * backward_scale, tiles,
                                     tied=tied_to_inputs(model, head))
        return Loss(_undefined_where(empty, scaled / backward_scale), hidden)

    return loss


def _undefined_where(empty: torch.Tensor | bool, value: torch.Tensor) -> torch.Tensor:
    if isinstance(empty, bool):
        return value * float("nan") if empty else value
    return value + torch.where(empty, float("nan"), 0.0).to(value)


token_mean_loss = weighted_loss(token_mean_weights)
"""``data.packing_loss: token``: the mean over every supervised token of the micro-batch."""
sample_mean_loss = weighted_loss(sample_mean_weights)
"""``data.packing_loss: sample``: each packed sample's token mean, averaged."""


def loss_for(data: DataConfig, train: TrainConfig, *, zero: int, backward_scale: float = 1.0) -> LossFn:
    """The loss ``data.packing`` / ``data.packing_loss`` ask for, tiled as ``train.logits_tile_mib``
    and the ZeRO stage allow (:func:`~hpc_train.train.logits_tiles.tile_mib_for`);
    ``backward_scale`` as :func:`weighted_loss`."""
    sample = data.packing and data.packing_loss == "sample"
    return weighted_loss(sample_mean_weights if sample else token_mean_weights, tile_mib_for(train, zero),
                         backward_scale)


def full_logits_loss(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's own token-mean loss over logits of every position (the reference the
    supervised-only loss equals; benchmarks and tests compare the two)."""
    forward = {k: v for k, v in inputs.items() if k not in (LOSS_POSITIONS, LOSS_TARGETS)}
    with masks_decided_on_host(model, forward), image_check_made(model):
        return model(**forward, use_cache=False).loss


__all__ = ["Loss", "LossFn", "Weights", "full_logits_loss", "loss_for", "per_sample_mean", "per_sample_weights",
           "sample_mean_loss", "sample_mean_weights", "supervised_logits", "token_losses", "token_mean_loss",
           "token_mean_weights", "weighted_loss"]
