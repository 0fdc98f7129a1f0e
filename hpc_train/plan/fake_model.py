"""The model a run trains, built with fake tensors: every parameter has its real shape, dtype
and ``requires_grad``, and no memory behind it.

It is built on the meta device (no initialisation runs), prepared exactly as a run prepares
its model (:func:`~hpc_train.train.trainable_model.prepare_for_training`: adapters, gradient
checkpointing, freezing, our attention), then given fake storage. QLoRA's 4-bit weights are
kept dense here: their bytes are counted by :mod:`hpc_train.plan.states`, and a frozen weight
adds no activations of its own (autograd saves a frozen linear's weight, never its input).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from hpc_train.config import RunConfig
from hpc_train.models.attention import use_varlen_attention
from hpc_train.models.families import Family
from hpc_train.models.image_tokens import image_tokens_always_match, mark_image_tokens_checked
from hpc_train.models.varlen_backend import PER_SAMPLE
from hpc_train.train.trainable_model import prepare_for_training


def model_config(config: RunConfig) -> Any:
    """The architecture of the configured model (a folder's ``config.json``, a preset's or the
    tiny model's), read without weights."""
    model = config.model
    if model.path is not None:
        from transformers import AutoConfig

        from hpc_train.models.load import model_folder

        return AutoConfig.from_pretrained(model_folder(model.path), local_files_only=True)
    if model.preset == "tiny":
        from hpc_train.models.tiny import build_tiny

        return build_tiny(model.family)[0].config
    from hpc_train.models.presets import get_preset
    from hpc_train.models.tiny import point_token_ids, preset_processor

    # As the run's saved preset (models.tiny.build_preset): its media ids are its tokenizer's.
    architecture = get_preset(model.preset).build_config()
    point_token_ids(architecture, preset_processor(model.preset).tokenizer)
    return architecture


def fake_training_model(config: RunConfig, family: Family, architecture: Any, processor: Any,
                        dtype: torch.dtype, mode: FakeTensorMode) -> nn.Module:
    """The run's model in ``dtype``, prepared for training, its tensors fake under ``mode``."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(architecture, dtype=dtype)
        if config.model.adapter is not None:
            from hpc_train.models.load import adapter_folder

            model = _with_adapter(model, adapter_folder(config.model.adapter))
        model = prepare_for_training(model, config, family)
    model.train()
    # Packed rows on a CPU plan go through the exact per-sample kernel; the GPU kernels keep
    # the same tensors (output and log-sum-exp per head) alive.
    use_varlen_attention(model, PER_SAMPLE)
    if image_tokens_always_match(model.config, processor, family.name):
        mark_image_tokens_checked(model)
    with mode:
        _give_fake_storage(model)
    return model


def _with_adapter(model: nn.Module, adapter: Path) -> nn.Module:
    """A saved adapter's layout (its ``adapter_config.json``) on the meta model."""
    from peft import PeftConfig, get_peft_model

    return get_peft_model(model, PeftConfig.from_pretrained(str(adapter)))


def _give_fake_storage(model: nn.Module) -> None:
    """Replace every meta parameter and buffer by an empty fake CPU tensor of its shape; one
    shared (tied) tensor stays one."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                made[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                               requires_grad=param.requires_grad)
            module._parameters[name] = made[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if id(buffer) not in made:
                made[id(buffer)] = torch.empty_like(buffer, device="cpu")
            module._buffers[name] = made[id(buffer)]
