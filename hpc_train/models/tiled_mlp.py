"""The language model's MLPs computed in tiles of the sequence, on DeepSpeed's ``TiledMLP``.

An MLP's intermediate activations (gate and up projections, ``intermediate_size`` wide: 3-4x
the hidden size) are a long sequence's largest. ``TiledMLP`` runs the MLP over a few tiles of
the sequence without keeping them, saves only its input, and recomputes tile by tile in the
backward (telling ZeRO when a weight's gradient is whole), so at most one tile's intermediates
exist at a time: one more MLP forward per step for that memory. Every rank uses the same
number of tiles (the rows are padded to a multiple of it), so under ZeRO-3 every rank gathers
the MLP's weights as often as the others.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hpc_train.models.families import get_family


def use_tiled_mlp(model: torch.nn.Module, family_name: str, tiles: int) -> int:
    """Make every decoder layer's MLP of ``model``'s language model run in ``tiles`` tiles
    while training; how many MLPs it changed."""
    if tiles < 2:
        raise ValueError(f"tiled MLP needs 2 tiles or more, not {tiles}")
    family = get_family(family_name)
    layers = family.language_model_of(model).layers
    for layer in layers:
        layer.mlp.forward = types.MethodType(_tiled(layer.mlp.forward, tiles), layer.mlp)
    return len(layers)


def _tiled(original: Callable[[torch.Tensor], torch.Tensor], tiles: int) -> Callable[..., torch.Tensor]:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return original(x)
        length = x.shape[-2]
        extra = -length % tiles  # torch.chunk makes exactly ``tiles`` pieces of a multiple of it
        padded = F.pad(x, (0, 0, 0, extra)) if extra else x
        weights = [p for p in self.parameters() if p.requires_grad]
        out = TiledMLP.apply(_call(original), self, padded, tiles, weights)
        return out[..., :length, :] if extra else out

    return forward


def _call(original: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    def fn(module: Any, x: torch.Tensor) -> torch.Tensor:
        return original(x)

    return fn


__all__ = ["use_tiled_mlp"]
