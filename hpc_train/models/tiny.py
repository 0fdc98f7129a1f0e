"""Tiny random models of each family, with a processor made offline, saved like a real one.

They exercise exactly the code paths a real checkpoint does (``save_pretrained`` to a
folder, ``from_pretrained`` back) without any download. Every linear layer is at least 64
wide: bitsandbytes' 4-bit kernels cannot quantize narrower layers. Each family module builds
its own (``Family.build_tiny``) from the parts here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from hpc_train.errors import ConfigError


def answer_words() -> list[str]:
    """Words every tiny tokenizer keeps as one token (the synthetic data's answers)."""
    from hpc_train.synthetic_words import COLOURS, PITCHES

    return [*COLOURS, *PITCHES]


def corpus() -> list[str]:
    """The text the tiny tokenizers are trained on."""
    from hpc_train.synthetic_words import vocabulary_text

    return vocabulary_text()


def seeded_model(model_class: type[PreTrainedModel], config: Any, tokenizer: Any, seed: int) -> PreTrainedModel:
    """``model_class(config)`` with weights drawn from ``seed``, its token ids the tokenizer's."""
    torch.manual_seed(seed)
    model = model_class(config)
    set_token_ids(model, tokenizer)
    return model


def build_tiny(family: str, **kwargs: object) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny random model of ``family`` and its offline processor."""
    from hpc_train.models.families import FAMILIES

    if family not in FAMILIES:
        raise ConfigError(f"no tiny model for family '{family}'. Fix: use one of {', '.join(FAMILIES)}")
    return FAMILIES[family].build_tiny(**kwargs)


def save_tiny(family: str, out_dir: str | Path, **kwargs: object) -> Path:
    """Build a tiny model and save model + processor to ``out_dir`` (loadable with from_pretrained)."""
    return _save(*build_tiny(family, **kwargs), out_dir)


def save_preset(name: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a published architecture (random weights) with its offline processor to ``out_dir``."""
    return _save(*build_preset(name, seed=seed), out_dir)


def _save(model: PreTrainedModel, processor: ProcessorMixin, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def text_config(model_type: str, width: int, tokenizer: Any) -> dict[str, Any]:
    """A 2-layer language model with grouped-query attention, as the real families use."""
    return {"model_type": model_type, "hidden_size": width, "intermediate_size": 2 * width,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": len(tokenizer), "max_position_embeddings": 4096,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "tie_word_embeddings": False}


def set_token_ids(model: PreTrainedModel, tokenizer: Any) -> None:
    """Point the model's special-token ids (media, pad, bos, eos) at this tokenizer's ids."""
    point_token_ids(model.config, tokenizer)
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id


def point_token_ids(config: Any, tokenizer: Any) -> None:
    """Point a model config's media and special-token ids at this tokenizer's (a preset's
    architecture carries the published ones); the media tokens are its family's."""
    from hpc_train.models.families import family_of_model_type  # the family modules import this one

    family = family_of_model_type(config.model_type)
    vocab = tokenizer.get_vocab()
    image = tokenizer.convert_tokens_to_ids(family.image_token)
    video = tokenizer.convert_tokens_to_ids(family.video_token) if family.video_token in vocab else None
    for name in ("image_token_id", "image_token_index"):
        if hasattr(config, name):
            setattr(config, name, image)
    if video is not None:
        for name in ("video_token_id", "video_token_index"):
            if hasattr(config, name):
                setattr(config, name, video)
    for name, token in (("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        if hasattr(config, name) and token in vocab:
            setattr(config, name, tokenizer.convert_tokens_to_ids(token))
    # The language model's config holds the special tokens (transformers deprecates
    # Idefics3's top-level pad_token_id in its favour; generation reads generation_config).
    text = getattr(config, "text_config", None) or config
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)


def preset_processor(name: str) -> ProcessorMixin:
    """An offline processor whose tiles and media tokens match the published architecture."""
    from hpc_train.models.families import FAMILIES
    from hpc_train.models.presets import get_preset

    preset = get_preset(name)
    return FAMILIES[preset.family].preset_processor(preset.build_config(), preset.tokens_per_image)


def build_preset(name: str, *, seed: int = 0, dtype: torch.dtype | None = None
                 ) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A published architecture with random weights and an offline processor of matching tile
    size (tiny tokenizer; its ids all fit the published vocabulary)."""
    from hpc_train.models.presets import build_model

    processor = preset_processor(name)
    torch.manual_seed(seed)
    model = build_model(name, dtype=dtype)
    set_token_ids(model, processor.tokenizer)
    return model, processor
