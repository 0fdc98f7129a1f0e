"""Edits to a loaded model: freezing, LoRA / QLoRA, and per-group optimizer parameters."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpc_train.config import LoraConfig, RunConfig
from hpc_train.errors import ConfigError
from hpc_train.models.families import Family

# PEFT prefixes every name with this; module groups are defined on the bare model.
_PEFT_PREFIX = "base_model.model."
_LINEAR_NAMES = r"(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|proj|linear_1|linear_2|qkv|mlp\.0|mlp\.2)"


def bare_name(name: str) -> str:
    """A parameter's or module's name in the model without its PEFT wrapper."""
    return name.removeprefix(_PEFT_PREFIX)


def group_of(name: str, family: Family) -> str:
    """The module group (vision / connector / llm / head) a parameter or module name belongs to."""
    bare = bare_name(name)
    for group, prefixes in family.module_groups.items():
        if bare.startswith(prefixes):
            return group
    raise ConfigError(f"parameter '{name}' is in no module group of the {family.name} family. "
                      "Fix: update Family.module_groups for this model layout")


def apply_freezing(model: nn.Module, family: Family, groups: Iterable[str]) -> None:
    """Make every parameter of the named groups non-trainable (``llm`` includes the head)."""
    frozen = set(groups)
    if "llm" in frozen:
        frozen.add("head")
    for name, param in model.named_parameters():
        if group_of(name, family) in frozen:
            param.requires_grad_(False)


def lora_target_regex(family: Family, target: str) -> str:
    """A regex over module names selecting the linear layers that get adapters."""
    wanted = {"llm": ["llm"], "llm+connector": ["llm", "connector"],
              "all": ["llm", "connector", "vision"]}[target]
    prefixes = [re.escape(p.rstrip(".")) for g in wanted for p in family.module_groups[g]]
    # a patch embedding's convolution (LLaVA-OneVision-1.5's patch_embed.proj) is no linear layer
    linear = r"(?!.*patch_embed\.)"
    return rf"^{linear}({'|'.join(prefixes)})\..*\.{_LINEAR_NAMES}$|^{linear}({'|'.join(prefixes)})\.{_LINEAR_NAMES}$"


def apply_lora(model: nn.Module, family: Family, lora: LoraConfig) -> nn.Module:
    """Wrap the model with LoRA adapters on the configured linear layers."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora_target_regex(family, lora.target), bias="none")
    return get_peft_model(model, config)


def quantization_config(family: Family, compute_dtype: torch.dtype, lora: LoraConfig,
                        zero_stage: int) -> Any:
    """4-bit NF4 for the language model; vision tower, connector and head stay unquantized.

    Under ZeRO-3 the packed 4-bit weights are stored in the compute dtype so DeepSpeed can
    partition them like any other parameter.
    """
    from transformers import BitsAndBytesConfig

    # transformers matches skip names from the start of the module path.
    skip = [p.rstrip(".") for g in ("vision", "connector", "head") for p in family.module_groups[g]]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=lora.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if zero_stage == 3 else torch.uint8,
        llm_int8_skip_modules=skip,
    )


def full_numel(param: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 holds only this rank's partition of it."""
    return int(getattr(param, "ds_numel", param.numel()))


@dataclass(frozen=True)
class GroupCount:
    """One module group's parameters (ZeRO-3 partitions counted whole)."""

    total: int
    """Its own weights (LoRA adapters not included)."""
    trainable: int
    """Its own weights that train."""
    lora: int
    """LoRA adapter parameters on its layers (they all train)."""


def param_census(model: nn.Module, family: Family) -> dict[str, GroupCount]:
    """Per module group (vision / connector / llm / head): total, trainable and LoRA parameters.
    The one count behind the run table, the memory estimate and the profiling report."""
    counts = {group: [0, 0, 0] for group in family.module_groups}
    for name, param in model.named_parameters():
        n, group = full_numel(param), counts[group_of(name, family)]
        if "lora_" in name:
            group[2] += n
        else:
            group[0] += n
            group[1] += n if param.requires_grad else 0
    return {g: GroupCount(*c) for g, c in counts.items()}


@dataclass
class ParamGroup:
    """One optimizer parameter group: a module group with or without weight decay."""

    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float

    @property
    def numel(self) -> int:
        return sum(full_numel(p) for p in self.params)

    def as_optimizer_group(self) -> dict[str, Any]:
        return {"params": self.params, "lr": self.lr, "weight_decay": self.weight_decay,
                "name": self.name}


def build_param_groups(model: nn.Module, family: Family, config: RunConfig) -> list[ParamGroup]:
    """Trainable parameters split by module group (for per-group rates) and by decay."""
    train = config.train
    groups: dict[tuple[str, bool], ParamGroup] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = group_of(name, family)
        # Biases and norm weights are vectors; decaying them only hurts.
        decay = train.weight_decay > 0 and param.ndim >= 2
        key = (group, decay)
        if key not in groups:
            lr = train.lr_groups.get(group, train.lr)
            label = group if not train.weight_decay else f"{group}{'' if decay else '/no_decay'}"
            groups[key] = ParamGroup(label, [], lr, train.weight_decay if decay else 0.0)
        groups[key].params.append(param)
    if not groups:
        raise ConfigError(
            f"nothing to train: mode={train.mode} with model.freeze={config.model.freeze} leaves no "
            "trainable parameter. Fix: unfreeze a group, or use train.mode=baseline to evaluate only")
    order = list(family.module_groups)
    return sorted(groups.values(), key=lambda g: (order.index(g.name.split("/")[0]), g.name))


def describe_param_groups(census: dict[str, GroupCount], groups: list[ParamGroup]) -> str:
    """The table printed at step 0: what is trained, how much, at which rate."""
    total = sum(c.total + c.lora for c in census.values())
    trainable = sum(g.numel for g in groups)
    lines = [f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / max(total, 1):.2f}%)",
             f"  {'group':<22}{'params':>14}{'lr':>12}{'weight decay':>14}"]
    for g in groups:
        lines.append(f"  {g.name:<22}{g.numel:>14,}{g.lr:>12.3g}{g.weight_decay:>14.3g}")
    return "\n".join(lines)


def describe_quantization(model: nn.Module, family: Family) -> str | None:
    """Which groups hold 4-bit layers (None when nothing is quantized)."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            group = group_of(name, family)
            counts[group] = counts.get(group, 0) + 1
    if not counts:
        return None
    kept = [g for g in family.module_groups if g not in counts]
    return (f"4-bit NF4: {sum(counts.values())} linear layers ("
            + ", ".join(f"{g} {n}" for g, n in counts.items())
            + f"); unquantized: {', '.join(kept)}")
