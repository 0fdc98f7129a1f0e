"""Load a model and/or its processor from a local folder or a preset, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from hpc_train.config import ModelConfig
from hpc_train.errors import ConfigError
from hpc_train.models.families import Family, family_of_model_type, get_family
from hpc_train.models.presets import get_preset
from hpc_train.models.tiny import build_preset, build_tiny, preset_processor


def model_family(model: ModelConfig) -> Family:
    """The family of the configured model; a named preset or a folder's own ``model_type`` must
    agree with it."""
    family = get_family(model.family)
    if model.preset is not None and model.preset != "tiny":
        found = get_preset(model.preset)
        if found.family != family.name:
            raise ConfigError(f"model.preset={model.preset} is a {found.family} model but model.family is "
                              f"{family.name}. Fix: set model.family={found.family}")
    if model.path is not None:
        folder = model_folder(model.path)
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
        found = family_of_model_type(model_type)
        if found.name != family.name:
            raise ConfigError(
                f"{folder}/config.json: model_type '{model_type}' is the {found.name} family, but "
                f"model.family is '{family.name}'. Fix: set model.family={found.name}"
            )
    return family


def load_processor(model: ModelConfig) -> Any:
    """The processor (tokenizer + image/video processors + chat template) of the configured model."""
    if model.preset == "tiny":
        return build_tiny(model.family)[1]
    if model.preset is not None:
        return preset_processor(model.preset)
    folder = model_folder(model.path)
    return AutoProcessor.from_pretrained(folder, local_files_only=True)


def load_model_and_processor(model: ModelConfig, **model_kwargs: object) -> tuple[PreTrainedModel, Any]:
    """The configured model with its processor (random weights for a preset)."""
    if model.preset == "tiny":
        return build_tiny(model.family)
    if model.preset is not None:
        return build_preset(model.preset)
    folder = model_folder(model.path)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    net = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, **model_kwargs)
    return net, processor


def model_folder(path: str | None) -> Path:
    """The saved model folder at ``path``; one that is not there fails with the fix."""
    folder = Path(path or "")
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.path={path}: no config.json there, so it is not a saved model folder. Fix: point "
            "model.path at a folder written by save_pretrained (`hpc-train make-tiny smolvlm DIR` "
            "writes one), or set model.preset=tiny"
        )
    return folder
