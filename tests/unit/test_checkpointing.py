"""Gradient checkpointing leaves a frozen vision tower out of the backward (no input of it made
to require grad), and gives the gradients of the same run without checkpointing: LoRA on the
language model, on everything, and full training with the tower frozen."""

from __future__ import annotations

import pytest
import torch

from hpc_train.config_file import load_config
from hpc_train.data.batching.collate import step_inputs
from hpc_train.models.load import model_family
from hpc_train.models.tiny import build_tiny
from hpc_train.train.loss import token_mean_loss
from hpc_train.train.profile_report import vision_tower
from hpc_train.train.trainable_model import prepare_for_training
from tests.conftest import TINY_RECIPES as RECIPES
from tests.conftest import mixed_samples
from tests.unit.test_supervised_loss import assert_same, loss_and_grads


def prepared(family: str, *overrides: str) -> torch.nn.Module:
    config = load_config(RECIPES[family], ["data.eval=null", "model.dtype=fp32", "train.device=cpu", "lora.dropout=0",
                                           *overrides])
    model, _ = build_tiny(family)
    model = prepare_for_training(model, config, model_family(config.model))
    return model.train()


@pytest.mark.parametrize("family", list(RECIPES))
@pytest.mark.parametrize("setting,tower_trains", [
    (["train.mode=lora", "lora.target=llm"], False),
    (["train.mode=full", "model.freeze=[vision]"], False),
    (["train.mode=lora", "lora.target=all"], True),
])
def test_checkpointing_keeps_a_frozen_tower_out_of_the_backward(family, setting, tower_trains, loaded_tiny,
                                                               synthetic_data):
    from hpc_train.data.batching.collate import Collator
    from hpc_train.models.families import get_family

    pad = loaded_tiny[family][1].tokenizer.pad_token_id
    inputs = step_inputs(Collator(get_family(family), pad)(mixed_samples(loaded_tiny, synthetic_data, family)))
    plain = prepared(family, *setting)
    checkpointed = prepared(family, *setting, "train.gradient_checkpointing=true")
    tower_outputs = []
    tower = vision_tower(checkpointed, get_family(family))
    if hasattr(tower, "merger"):  # LLaVA-OneVision-1.5's tower module holds the connector: its blocks end the tower
        tower = tower.blocks[-1]
    handle = tower.register_forward_hook(lambda module, args, out: tower_outputs.append(out[0] if isinstance(
        out, tuple) else getattr(out, "last_hidden_state", out)))
    try:
        expected = loss_and_grads(plain, lambda: token_mean_loss(plain, inputs).value)
        got = loss_and_grads(checkpointed, lambda: token_mean_loss(checkpointed, inputs).value)
    finally:
        handle.remove()
    assert tower_outputs and all(out.requires_grad == tower_trains for out in tower_outputs)
    assert_same(expected, got)
