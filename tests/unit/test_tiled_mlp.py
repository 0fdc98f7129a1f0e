"""The language model's MLPs in tiles (DeepSpeed's TiledMLP): the same loss and gradients as
whole, both families, padded and packed rows of every kind of sample (the tile count forces
padding of the rows); evaluation runs the MLPs whole."""

from __future__ import annotations

import copy

import pytest
import torch

from hpc_train.data.batching.collate import Collator, step_inputs
from hpc_train.data.batching.packing import pack_samples
from hpc_train.data.encoding.loss_positions import loss_positions
from hpc_train.models.families import get_family
from hpc_train.models.tiled_mlp import use_tiled_mlp
from hpc_train.train.loss import token_mean_loss
from tests.conftest import mixed_samples

from .test_supervised_loss import FAMILIES, assert_same, loss_and_grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_tiled_mlps_train_as_whole_ones(loaded_tiny, varlen_tiny, synthetic_data, family, layout):
    samples = mixed_samples(loaded_tiny, synthetic_data, family)
    pad = loaded_tiny[family][1].tokenizer.pad_token_id
    if layout == "padded":
        inputs = step_inputs(Collator(get_family(family), pad)(samples))
    else:
        batch = pack_samples(samples, pad_token_id=pad, family_name=family, pad_to=sum(map(len, samples)) + 7)
        inputs = {**step_inputs(batch), **loss_positions(batch["labels"])}
    rows, length = inputs["input_ids"].shape
    tiles = next(t for t in (3, 4, 5, 7) if length % t)  # so the rows must be padded to a multiple
    whole = copy.deepcopy(varlen_tiny[family]).train()
    tiled = copy.deepcopy(whole)
    assert use_tiled_mlp(tiled, family, tiles=tiles) == whole.config.text_config.num_hidden_layers
    calls: list[int] = []
    text = get_family(family).language_model
    mlp = next(m for n, m in tiled.named_modules() if n.endswith(f"{text}.layers.0.mlp"))
    hook = mlp.down_proj.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[-2]))
    assert_same(loss_and_grads(whole, lambda: token_mean_loss(whole, inputs).value),
                loss_and_grads(tiled, lambda: token_mean_loss(tiled, inputs).value))
    tile = -(-length // tiles)
    # the tiles forward, each recomputed in the backward (rows flattened); never the whole row
    assert calls == [tile] * tiles + [rows * tile] * tiles
    calls.clear()
    tiled.eval()
    with torch.no_grad():
        token_mean_loss(tiled, inputs)
    assert calls == [length]  # evaluation: whole
    hook.remove()
