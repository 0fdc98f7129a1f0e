"""Load a model and/or its processor from a local folder or a preset, offline."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from hpc_train.config import ModelConfig
from hpc_train.errors import ConfigError
from hpc_train.models.families import Family, family_of_config, get_family
from hpc_train.models.hub import resolve
from hpc_train.models.presets import get_preset
from hpc_train.models.tiny import build_preset, build_tiny, preset_processor
from hpc_train.safe_load import refusing_code


def model_family(model: ModelConfig) -> Family:
    """The family of the configured model: a named preset's, or the one a folder's ``config.json``
    says it is (``model_type``), else ``model.family``. A ``model.family`` set in the config must
    agree with the preset or folder."""
    explicit = "family" in model.model_fields_set
    if model.preset is not None and model.preset != "tiny":
        found = get_family(get_preset(model.preset).family)
        if explicit and found.name != model.family:
            raise ConfigError(f"model.preset={model.preset} is a {found.name} model but model.family is "
                              f"{model.family}. Fix: set model.family={found.name}, or leave it out")
        return found
    if model.path is not None:
        config_file = model_folder(model.path) / "config.json"
        found = family_of_config(json.loads(config_file.read_text()), str(config_file))
        if explicit and found.name != model.family:
            raise ConfigError(
                f"{config_file}: model_type '{found.model_types[0]}' is the {found.name} family ({found.title}), "
                f"but model.family is '{model.family}'. Fix: set model.family={found.name}, or leave it out")
        return found
    return get_family(model.family)


def with_family(model: ModelConfig) -> ModelConfig:
    """``model`` with ``family`` set to the one its preset or folder is (see :func:`model_family`)."""
    return model.model_copy(update={"family": model_family(model).name})


class MissingPackage(ConfigError):
    """The model's processor needs a package this environment lacks (SmolVLM2's: num2words)."""


@contextlib.contextmanager
def _packages_for(what: str) -> Iterator[None]:
    """A processor class that imports a package only when it is made fails with the fix."""
    try:
        yield
    except ImportError as exc:
        raise MissingPackage(f"{what}: its processor needs a package that is not installed here ({exc}). Fix: "
                             "pip install -c hpc_train/constraints.txt -e . (setup.cfg lists it)") from exc


def load_processor(model: ModelConfig) -> Any:
    """The processor (tokenizer + image/video processors + chat template) of the configured model."""
    with _packages_for(model.path or f"model.preset={model.preset}"):
        if model.preset == "tiny":
            return build_tiny(model.family)[1]
        if model.preset is not None:
            return preset_processor(model.preset)
        return AutoProcessor.from_pretrained(model_folder(model.path), local_files_only=True)


def load_model_and_processor(model: ModelConfig, **model_kwargs: object) -> tuple[PreTrainedModel, Any]:
    """The configured model with its processor (random weights for a preset)."""
    if model.preset is not None:
        with _packages_for(f"model.preset={model.preset}"):
            return build_tiny(model.family) if model.preset == "tiny" else build_preset(model.preset)
    folder = model_folder(model.path)
    with _packages_for(str(folder)):
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    with refusing_code(folder, "model.path"):
        net, loading = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True,
                                                                   output_loading_info=True, **model_kwargs)
    if model_family(model).strict_weights:
        check_loaded_keys(folder, loading)
    return net, processor


def check_loaded_keys(folder: Path, loading: dict[str, Any]) -> None:
    """A folder whose weights miss a parameter of the model (left random) or hold one it has no
    place for (dropped) is not this model's checkpoint: refused, naming the keys. (Under ZeRO-3
    transformers reports no unused keys; a renamed key still shows as missing.)"""
    problems = []
    for what, key in (("missing from its weights (they would stay random)", "missing_keys"),
                      ("in its weights but not in the model (they would be dropped)", "unexpected_keys"),
                      ("of another shape than the model's", "mismatched_keys")):
        names = sorted(str(name if isinstance(name, str) else name[0]) for name in loading.get(key) or ())
        if names:
            problems.append(f"{len(names)} parameters {what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if problems:
        raise ConfigError(f"{folder}: the weights do not fit the model its config.json describes; "
                          + "; ".join(problems) + ". Fix: point model.path at the checkpoint folder as published "
                          "(or as hpc-train export wrote it), with its config.json and all of its weight files")


def model_folder(path: str | None) -> Path:
    """The saved model folder ``path`` names: a folder, or a hub id read from the local cache; one
    that is not there fails with the fix."""
    return resolve(path or "", "model.path").folder


def pin_revisions(model: ModelConfig) -> ModelConfig:
    """``model`` with each hub id in it pinned to the commit the local cache resolves it to, so
    that ``config.resolved.yaml`` reruns exactly these weights (folders are left as they are)."""
    update = {}
    if model.path is not None:
        update["path"] = resolve(model.path, "model.path").pinned(model.path)
    if model.adapter is not None:
        update["adapter"] = resolve(model.adapter, "model.adapter", "adapter_config.json").pinned(model.adapter)
    return model.model_copy(update=update)


def adapter_folder(adapter: str) -> Path:
    """The LoRA adapter folder ``model.adapter`` names (a folder or a hub id, as for model.path)."""
    return resolve(adapter, "model.adapter", marker="adapter_config.json").folder
