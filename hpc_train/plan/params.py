"""The run's parameters as DeepSpeed will hold them: trainable ones in the optimizer's groups and
order, frozen ones as stored (QLoRA's language-model linears packed to 4 bits)."""

from __future__ import annotations

import math

from torch import nn

from hpc_train.config import RunConfig
from hpc_train.models.adapters import build_param_groups, group_of
from hpc_train.models.families import Family
from hpc_train.plan.states import Param

_NF4_BLOCK = 64
"""bitsandbytes quantizes 64 weights per absmax constant."""
_DOUBLE_QUANT_BLOCK = 256
"""With double quantization, 256 absmax constants share one fp32 constant (themselves in uint8)."""
_NF4_CODE = 16 * 4
"""The 16 NF4 levels, fp32, per layer."""
_NESTED_CODE = 256 * 4 + 4
"""With double quantization: the nested code (256 levels, fp32) and its offset, per layer."""


def deepspeed_params(model: nn.Module, family: Family, config: RunConfig, element_size: int, zero_stage: int
                     ) -> tuple[list[list[Param]], list[Param]]:
    """(trainable groups, frozen) of the fake training model ``model``."""
    stored = stored_params(model, family, config, element_size, zero_stage)
    groups = [[stored[id(p)] for p in g.params]
              for g in build_param_groups(model, family, config)] if config.train.mode != "baseline" else []
    return groups, [stored[id(p)] for p in model.parameters() if not p.requires_grad]


def stored_params(model: nn.Module, family: Family, config: RunConfig, element_size: int, zero_stage: int
                  ) -> dict[int, Param]:
    """``id(param)`` -> each parameter of the fake training model ``model`` as DeepSpeed stores it."""
    quantized = _quantized_weights(model, family) if config.train.mode == "qlora" else set()
    stored = {}
    for param in model.parameters():
        if id(param) in quantized and not param.requires_grad:
            stored[id(param)] = _nf4(param.numel(), element_size, zero_stage, config.lora.double_quant)
        else:
            stored[id(param)] = Param(param.numel(), element_size, param.requires_grad)
    return stored


def _quantized_weights(model: nn.Module, family: Family) -> set[int]:
    """The weights QLoRA stores in 4 bits: every linear layer of the language model (the vision
    tower, connector and head are skipped, as in :func:`~hpc_train.models.adapters.quantization_config`),
    LoRA's own layers excepted."""
    found = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".lora_" not in name and group_of(f"{name}.weight", family) == "llm":
            found.add(id(module.weight))
    return found


def _nf4(weights: int, element_size: int, zero_stage: int, double_quant: bool) -> Param:
    """A 4-bit weight: two per byte, stored as bytes (ZeRO-3: in the compute dtype, so that
    DeepSpeed partitions it), with its absmax constants beside it."""
    packed = math.ceil(weights / 2)
    blocks = math.ceil(weights / _NF4_BLOCK)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / _DOUBLE_QUANT_BLOCK) + _NF4_CODE + _NESTED_CODE
    else:
        constants = 4 * blocks + _NF4_CODE
    storage = element_size if zero_stage == 3 else 1
    return Param(math.ceil(packed / storage), storage, False, constants=constants)
