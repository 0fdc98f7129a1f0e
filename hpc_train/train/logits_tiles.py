"""The head and its loss in tiles of supervised positions, DeepSpeed's ``TiledFusedLogitsLoss``,
for micro-batches whose supervised fp32 logits would pass ``train.logits_tile_mib``.

Our head makes logits at the supervised positions only; that is all there is to it while the
answers are short (tens to hundreds of tokens after a long video). Long captions and
text-heavy rows supervise thousands of positions, and their fp32 logits, log-softmax and
gradient (three tensors of positions x vocabulary) become the step's largest allocation.
DeepSpeed's tiled loss then runs the head and loss over one tile of those positions at a time
and takes each tile's backward inside the forward, so one tile's logits exist at once
(``benchmarks/logits_loss.py``: 596 MiB instead of 2,310 at 4,096 positions of a 49k
vocabulary). The model itself runs with its head passed through, so its output is the kept
positions' last hidden states.

A head tied to the input embeddings also takes the embeddings' gradient in the outer backward;
DeepSpeed must then reduce it once, after both (its ``ds_grad_is_ready`` flag is held down
over the tiles). An untied trained head is reduced by DeepSpeed after its last tile. Either
way the loop's backward scales the loss (1 / grad_accum) and never reaches the head's own
gradient, so the tiles take it at that scale (``backward_scale`` in :mod:`hpc_train.train.loss`).

Under ZeRO-3 the head stays whole: each call of a partitioned head gathers its weight over every
rank, so ranks whose micro-batches make different numbers of tiles would make different
collectives.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from hpc_train.config import TrainConfig
from hpc_train.data.encoding.tokenize import IGNORE_INDEX

LOGITS_BYTES = 4
"""The head's logits are taken to fp32 for the loss."""


def logits_tiles(positions: int, vocab: int, tile_mib: float) -> int:
    """How many tiles keep each tile's fp32 logits of ``positions`` x ``vocab`` within ``tile_mib``."""
    return max(1, math.ceil(positions * vocab * LOGITS_BYTES / (tile_mib * 2**20)))


def tile_mib_for(train: TrainConfig, zero: int) -> float | None:
    """The tile size the run's loss uses: ``train.logits_tile_mib``; ``None`` (never tiled) under
    ZeRO-3, whose gathers of the head must be the same on every rank."""
    return train.logits_tile_mib if zero < 3 else None


def describe_tiles(model: Any, train: TrainConfig, zero: int) -> str:
    """One line for the run's log: how many supervised positions make one tile."""
    tile_mib = tile_mib_for(train, zero)
    if tile_mib is None:
        return "supervised positions only, never in tiles under ZeRO-3 (train.logits_tile_mib applies to ZeRO-0/1/2)"
    per_tile = int(tile_mib * 2**20 // (output_head(model).out_features * LOGITS_BYTES))
    return (f"supervised positions only, in tiles of {max(per_tile, 1):,} positions past that many "
            f"(train.logits_tile_mib={tile_mib:g})")


def output_head(model: Any) -> torch.nn.Module:
    """The language-model head of a model, a PEFT model or a DeepSpeed engine around either."""
    return getattr(model, "module", model).get_output_embeddings()


@contextlib.contextmanager
def head_passed_through(head: torch.nn.Module) -> Iterator[None]:
    """The model's forward returns its head's input: the kept positions' last hidden states.
    The module is still called, so DeepSpeed's hooks on it see the same calls every step."""
    own = head.__dict__.get("forward")  # a wrapper someone put on this module
    head.forward = _pass_through
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _pass_through(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def tiled_weighted_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                        weights: torch.Tensor, tiles: int, *, tied: bool) -> torch.Tensor:
    """``sum(weights * cross_entropy(head(hidden), targets))`` over (rows, K) positions, in
    ``tiles`` tiles; ``weights`` finite (0 where nothing is supervised); ``tied``: the head's
    weight is also the input embeddings' (:func:`tied_to_inputs`)."""
    trained = [p for p in head.parameters() if p.requires_grad]
    with _held_until_outer_backward(trained if tied else []):
        return _tiled_loss().apply(_tile_loss, head, hidden, targets, weights, tiles, [] if tied else trained, "sum")


@functools.cache
def _tiled_loss() -> type[torch.autograd.Function]:
    """DeepSpeed's tiled loss, its backward without the host read of the incoming gradient
    (``if grads[0] != 1.0``: a device sync per micro-batch on a GPU, and an error on the plan's
    fake tensors)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    class TiledLossWithoutReads(TiledFusedLogitsLoss):
        @staticmethod
        def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            (x_grad,) = ctx.saved_tensors
            return (None, None, x_grad.mul_(grads[0]), None, None, None, None, None, None)

    return TiledLossWithoutReads


def _tile_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    # Its forward, not its call: no module hook is needed outside ZeRO-3, and PyTorch's
    # MemTracker (the plan) refuses a module called again outside the model's forward.
    losses = F.cross_entropy(head.forward(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return (losses * weights).sum()


def tied_to_inputs(model: Any, head: torch.nn.Module) -> bool:
    """Whether ``head`` shares a parameter with the model's input embeddings."""
    embeddings = getattr(model, "module", model).get_input_embeddings()
    return any(p is q for p in head.parameters() for q in embeddings.parameters())


@contextlib.contextmanager
def _held_until_outer_backward(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """DeepSpeed does not reduce these parameters' gradients while the tiles run."""
    for param in params:
        param.ds_grad_is_ready = False
    try:
        yield
    finally:
        for param in params:
            param.ds_grad_is_ready = True


__all__ = ["LOGITS_BYTES", "describe_tiles", "head_passed_through", "logits_tiles", "output_head", "tied_to_inputs", "tile_mib_for", "tiled_weighted_loss"]
