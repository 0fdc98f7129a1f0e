"""Putting a checkpoint's module state back into the run's model (DeepSpeed's ``custom_load_fn``).

``state_dict()`` of a 4-bit layer (bitsandbytes' ``Linear4bit``, QLoRA) holds its packed weight
and its quantization state (``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``,
``weight.quant_state.bitsandbytes__nf4``), but ``load_state_dict`` takes only the packed
weight back, so DeepSpeed's strict load refuses a QLoRA run's own checkpoint. Those layers are
frozen: quantized from ``model.path`` at every start, they hold what the checkpoint holds, so
their entries are not loaded (as ZeRO-3 never loads a frozen weight's partition). Everything
else loads as strictly as DeepSpeed would: a key missing on either side is an error naming it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def four_bit_weights(model: nn.Module) -> set[str]:
    """State-dict names of the 4-bit weights in ``model`` (``<layer>.weight``)."""
    names = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            names.add(f"{name}.weight" if name else "weight")
    return names


def restore_module(src: dict[str, Any], dst: nn.Module) -> None:
    """Load ``src`` (a saved ``state_dict``) into ``dst``, leaving its 4-bit layers as loaded
    from ``model.path``; ``RuntimeError`` naming the keys when the two do not match."""
    rebuilt = four_bit_weights(dst)

    def own(key: str) -> bool:
        return not any(key == w or key.startswith(f"{w}.") for w in rebuilt)

    with torch.no_grad():
        result = dst.load_state_dict({k: v for k, v in src.items() if own(k)}, strict=False)
    missing = [k for k in result.missing_keys if own(k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the checkpoint's weights do not match this run's model: "
            f"{_some(missing, 'missing from the checkpoint')}{_some(result.unexpected_keys, 'not in this model')}")


def _some(keys: list[str], what: str) -> str:
    if not keys:
        return ""
    return f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}); "


__all__ = ["four_bit_weights", "restore_module"]
