"""Where a batch's loss is: the positions whose next-token label is supervised, found on the
host while collating, so the language model's head runs on those positions only.

Most positions of VLM data are media or prompt tokens with label -100; the head's fp32 logits
over the whole row (vocabulary x tokens) are often the largest activation of a step. Found in
the collator (a DataLoader worker), the positions cost the training process no device read.
"""

from __future__ import annotations

import torch

from hpc_train.data.encoding.tokenize import IGNORE_INDEX

LOSS_POSITIONS = "loss_positions"
"""(rows, K) int64: position t of a row is kept when ``labels[row, t + 1]`` is supervised;
given to the model as transformers' ``logits_to_keep``."""
LOSS_TARGETS = "loss_targets"
"""(rows, K) int64: the label each kept position predicts; -100 where a row has fewer than K."""
LOSS_KEYS = (LOSS_POSITIONS, LOSS_TARGETS)


def loss_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The kept positions and their targets for a (rows, seq) label tensor on the host.

    Rows with fewer supervised positions than the longest are filled with position 0 and
    target -100 (ignored by the loss). At least one position is always kept, so a batch
    without a supervised token still runs the head (its loss is 0/0, NaN, as the full loss
    would be) and the loop can send a gradient through it.
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    width = max(1, int(supervised.sum(1).max())) if labels.shape[0] else 1
    positions = torch.zeros(labels.shape[0], width, dtype=torch.long)
    kept = torch.full((labels.shape[0], width), IGNORE_INDEX, dtype=torch.long)
    for row in range(labels.shape[0]):
        where = supervised[row].nonzero().squeeze(1)
        positions[row, : len(where)] = where
        kept[row, : len(where)] = targets[row, where]
    return {LOSS_POSITIONS: positions, LOSS_TARGETS: kept}


def num_supervised(labels: torch.Tensor) -> int:
    """Supervised next-token targets of a (rows, seq) label tensor (what the loss averages)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


__all__ = ["LOSS_KEYS", "LOSS_POSITIONS", "LOSS_TARGETS", "loss_positions", "num_supervised"]
