"""Published SmolVLM / SmolVLM2 / LLaVA-OneVision architectures, built offline with random weights.

Each preset holds the layer sizes of a released checkpoint's ``config.json``, so a model can
be built for planning (on the ``meta`` device: no memory), for throughput benchmarks, or as a
randomly initialised starting point, without anything being downloaded. ``hf_id`` only says
where the trained weights live; it is never fetched.

Each preset is built with its family's classes (``Family.config_class`` / ``model_class``):
SmolVLM as transformers' Idefics3, SmolVLM2 as transformers' SmolVLM, LLaVA-OneVision as
``LlavaOnevisionForConditionalGeneration``; its processor (``models.tiny.preset_processor``) has
the published processor settings (images split into tiles) at the preset's tile size.

The presets live in their family's module (``Family.presets``); this module gathers them.
Where the numbers come from: each preset's comment names the checkpoint repo and file. The hub
itself cannot be reached from here, so the values were read from copies of those files quoted
in public code and from the model cards, and cross-checked by rebuilding each model: every
total lands within 0.2% of the exact figure its model page shows (see tests/unit/test_presets.py).
"""

from __future__ import annotations

import difflib

import torch
from transformers import PreTrainedModel

from hpc_train.errors import ConfigError
from hpc_train.models.families import FAMILIES
from hpc_train.models.families.base import Preset

GROUPS = ("vision", "connector", "llm", "head")
"""The module groups ``count_parameters`` reports, besides ``total``."""

PRESETS: dict[str, Preset] = {p.name: p for family in FAMILIES.values() for p in family.presets}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises ConfigError with the closest match."""
    try:
        return PRESETS[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"unknown model preset '{name}'{hint}. Fix: use one of {', '.join(PRESETS)}"
    )


def build_model(name: str, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The preset's model with random weights, built directly on ``device`` in ``dtype``.

    ``device="meta"`` allocates nothing: use it to count parameters or plan memory. Building
    in place (rather than on CPU and then ``.to()``) keeps a 7B model from ever needing a
    full fp32 copy in host memory.
    """
    preset = get_preset(name)
    config = preset.build_config()
    model_class = FAMILIES[preset.family].model_class
    with torch.device(device):
        # _from_config sets the default dtype while the modules are created.
        model = model_class._from_config(config, dtype=dtype)
    return model


def count_parameters(name: str) -> dict[str, int]:
    """Parameters of the preset by module group, counted on the meta device.

    Returns ``total`` plus ``vision``, ``connector``, ``llm`` and ``head`` (prefixes from the
    family's ``module_groups``). Each shared tensor counts once, as in the published totals:
    a head tied to the input embedding has no parameters of its own, so ``head`` is 0 there
    and the shared matrix is counted under ``llm``.
    """
    from hpc_train.models.adapters import param_census

    census = param_census(build_model(name, device="meta"), FAMILIES[get_preset(name).family])
    counts = {group: census[group].total for group in GROUPS}
    return {"total": sum(counts.values()), **counts}
