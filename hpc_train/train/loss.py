"""The loss the optimizer sees, chosen once per run from the config.

``token``: the model's own mean over every supervised token of the micro-batch (packed rows
included: the same as the samples unpacked together). ``sample`` (packing only): each packed
sample's own token mean, averaged, so short answers weigh as much as long ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hpc_train.config import DataConfig
from hpc_train.data.tokenize import IGNORE_INDEX

LossFn = Callable[[Any, dict[str, Any]], torch.Tensor]
"""``loss(model, inputs)``: one forward pass and its loss."""


def token_mean_loss(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs, use_cache=False).loss


def sample_mean_loss(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    return per_sample_mean_loss(logits, inputs["labels"], inputs["cu_seq_lens_q"])


def loss_for(data: DataConfig) -> LossFn:
    """The loss ``data.packing`` / ``data.packing_loss`` ask for."""
    return sample_mean_loss if data.packing and data.packing_loss == "sample" else token_mean_loss


def per_sample_mean_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean over the row's samples of each sample's token-mean loss (samples without a
    supervised token, such as blank media, do not count)."""
    shifted = logits[0, :-1].float()
    targets = labels[0, 1:]
    losses = torch.nn.functional.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="none")
    supervised = (targets != IGNORE_INDEX).float()
    # Token t+1's label is predicted at position t: segment k covers targets cu[k]..cu[k+1]-1
    # shifted by one, and the shift never crosses a boundary because each sample's first
    # label is -100.
    segment = torch.bucketize(torch.arange(1, labels.shape[1], device=labels.device),
                              cu_seqlens[1:].to(labels.device), right=True)
    count = torch.zeros(len(cu_seqlens) - 1, device=logits.device).index_add_(0, segment, supervised)
    total = torch.zeros_like(count).index_add_(0, segment, losses * supervised)
    present = count > 0
    return (total[present] / count[present]).mean()


__all__ = ["LossFn", "loss_for", "per_sample_mean_loss", "sample_mean_loss", "token_mean_loss"]
