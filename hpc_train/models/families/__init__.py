"""The model families, one module each (:mod:`.base` says what a family is).

- ``smolvlm``: SmolVLM, transformers' Idefics3; a video is a run of images, one tile a frame.
- ``smolvlm2``: SmolVLM2, transformers' SmolVLM; a video goes through its processor's video path
  (an intro line, then "Frame from MM:SS:" and one unsplit image per frame).
- ``llava_onevision``: LLaVA-OneVision; videos have their own pooled-frame path.
- ``llava_onevision_1_5``: LLaVA-OneVision-1.5, RICE-ViT + Qwen3 (our model class, the hub's
  parameter names); images and frames at their own size, ``t·h·w / 4`` tokens each.

Audio (``<speech>``) reaches every family as a spectrogram picture (an image), since none has an
audio encoder. A saved folder says which family it is (``model_type`` in its ``config.json``).
Adding a family means adding its module here, and its tests.
"""

from __future__ import annotations

from typing import Any

from hpc_train.errors import ConfigError
from hpc_train.models.families import llava_onevision, llava_onevision_1_5, smolvlm, smolvlm2
from hpc_train.models.families.base import Family, MediaLayout

FAMILIES: dict[str, Family] = {f.name: f for f in (smolvlm.FAMILY, smolvlm2.FAMILY, llava_onevision.FAMILY,
                                                   llava_onevision_1_5.FAMILY)}
_BY_MODEL_TYPE = {model_type: f for f in FAMILIES.values() for model_type in f.model_types}


def get_family(name: str) -> Family:
    """The family called ``name``."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown model family '{name}'. Fix: use one of {', '.join(sorted(FAMILIES))}"
        ) from None


def family_of_model_type(model_type: str, where: str = "config.json") -> Family:
    """The family of a saved model, from its ``config.json`` ``model_type``."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        known = ", ".join(f"{f.title} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
        raise ConfigError(
            f"{where}: model_type '{model_type}' is not a supported family. Fix: use a model folder of one of: {known}"
        ) from None


def family_of_config(config: dict[str, Any], where: str = "config.json") -> Family:
    """The family a saved ``config.json`` (read as a dict) describes."""
    return family_of_model_type(str(config.get("model_type", "")), where)


__all__ = ["FAMILIES", "Family", "MediaLayout", "family_of_config", "family_of_model_type", "get_family"]
