"""Load the model a run trains: source folder, dtype, QLoRA, ZeRO-3 partitioning, adapters."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from hpc_train.config import RunConfig
from hpc_train.device import native_bf16
from hpc_train.dist import DistInfo
from hpc_train.models.adapters import apply_freezing, apply_lora, quantization_config
from hpc_train.models.families import Family
from hpc_train.models.load import adapter_folder, model_family, model_folder
from hpc_train.models.tiny import save_preset, save_tiny
from hpc_train.safe_load import refusing_code
from hpc_train.train.engine import zero_stage
from hpc_train.train.output_dir import OutputError, agreed, is_write_failure, write_failure


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    family: Family
    dtype: torch.dtype
    source: Path
    keepalive: object = None
    """Holds transformers' ZeRO-3 config for the run (it is only weakly referenced there)."""


def compute_dtype(config: RunConfig, device: torch.device | None = None) -> torch.dtype:
    """``model.dtype``, or for ``auto``: bf16 on a GPU that computes it natively, fp32 otherwise.
    ``device``: the run's (default: the current GPU, unless ``train.device=cpu``)."""
    if config.model.dtype == "bf16":
        return torch.bfloat16
    if config.model.dtype == "fp32" or config.train.device == "cpu":
        return torch.float32
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None and device.type == "cuda" and native_bf16(torch.cuda.get_device_capability(device)):
        return torch.bfloat16
    return torch.float32


def hidden_size(source: Path) -> int:
    """The language model's hidden size, read from the folder's config (no weights loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source, local_files_only=True)
    return int(getattr(cfg, "text_config", cfg).hidden_size)


def model_source(config: RunConfig, info: DistInfo) -> Path:
    """The folder to load; a preset is written once (by rank 0) to ``output_dir/base_model``,
    whole or not at all: a write that fails (a full disk) stops every rank with the path and a fix."""
    if config.model.path is not None:
        return model_folder(config.model.path)
    folder = Path(config.output_dir) / "base_model"
    problem = agreed(_write_preset(config, folder) if info.is_main else None)
    if problem:
        raise OutputError(problem)
    return folder


def _write_preset(config: RunConfig, folder: Path) -> str | None:
    """Save the preset into a staging folder renamed to ``folder`` once whole; the write failure's
    message, or None. A folder without weights (left by an hpc-train before this one) is redone."""
    if (folder / "config.json").is_file() and any(folder.glob("model*.safetensors")):
        return None
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if config.model.preset == "tiny":
            save_tiny(config.model.family, staging, seed=config.train.seed)
        else:
            save_preset(config.model.preset, staging, seed=config.train.seed)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        shutil.rmtree(staging, ignore_errors=True)  # a partial copy must not keep the disk full
        return f"{write_failure(folder, exc)} (the {config.model.preset} preset's weights were not written)"
    return None


def load_training_model(config: RunConfig, info: DistInfo, device: torch.device, source: Path,
                        ds_config: dict[str, Any] | None) -> LoadedModel:
    """The model with freezing and adapters applied, ready for ``deepspeed.initialize``."""
    family = model_family(config.model)
    dtype = compute_dtype(config, device)
    mode = config.train.mode
    stage = zero_stage(ds_config)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    zero3_marker = None
    if mode == "qlora":
        kwargs["quantization_config"] = quantization_config(family, dtype, config.lora, stage)
        kwargs["device_map"] = {"": device}
    elif stage == 3 and ds_config is not None:
        # Load straight into ZeRO-3 partitions (never a full copy per rank).
        from transformers.integrations import HfDeepSpeedConfig

        zero3_marker = HfDeepSpeedConfig(ds_config)
    with refusing_code(source, "model.path"):
        model: PreTrainedModel = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    if config.model.adapter is not None:
        from peft import PeftModel

        adapter = adapter_folder(config.model.adapter)
        with refusing_code(adapter, "model.adapter"):
            model = PeftModel.from_pretrained(model, adapter, is_trainable=mode in ("lora", "qlora"))
    model = prepare_for_training(model, config, family)
    if mode != "qlora" and stage != 3:
        model.to(device)
    return LoadedModel(model=model, processor=processor, family=family, dtype=dtype, source=source,
                       keepalive=zero3_marker)


def prepare_for_training(model: torch.nn.Module, config: RunConfig, family: Family) -> torch.nn.Module:
    """What every run does to the loaded model (an adapter from ``model.adapter`` already on it):
    no cache, LoRA adapters, gradient checkpointing, freezing. ``hpc-train plan`` prepares its
    fake model with the same call, so the plan sees the run's trainable set."""
    mode = config.train.mode
    _no_cache(model)
    if mode == "baseline":
        model.requires_grad_(False)
    elif mode in ("lora", "qlora") and config.model.adapter is None:
        model.requires_grad_(False)
        model = apply_lora(model, family, config.lora)
    if config.train.gradient_checkpointing and mode != "baseline":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        _no_input_grads(model)
    apply_freezing(model, family, config.model.freeze)
    return model


def _no_input_grads(model: torch.nn.Module) -> None:
    """Transformers and PEFT make every sub-model's input embeddings require grad when
    checkpointing is enabled, which reentrant checkpointing needs and ours (non-reentrant) does
    not. The vision tower's are among them: a frozen tower would then keep its activations and
    run its backward (and its recompute) for a gradient nobody uses."""
    model.disable_input_require_grads()


def _no_cache(model: torch.nn.Module) -> None:
    # transformers skips packed-sequence detection and builds a cache when use_cache is on,
    # even in train mode; training never wants a cache.
    config = model.config
    config.use_cache = False
    for sub in ("text_config",):
        if hasattr(config, sub):
            getattr(config, sub).use_cache = False
