"""Tiny random models of each family, with a processor made offline, saved like a real one.

They exercise exactly the code paths a real checkpoint does (``save_pretrained`` to a
folder, ``from_pretrained`` back) without any download. Every linear layer is at least 64
wide: bitsandbytes' 4-bit kernels cannot quantize narrower layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor
from transformers.models.llava_onevision.image_processing_llava_onevision import (
    LlavaOnevisionImageProcessor,
)
from transformers.models.llava_onevision.video_processing_llava_onevision import (
    LlavaOnevisionVideoProcessor,
)

from hpc_train.errors import ConfigError
from hpc_train.models.tokenizer import train_tokenizer

# Same layout as the published SmolVLM template: "User:<image>question<end_of_utterance>\n".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Qwen-style turns, as LLaVA-OneVision's language model was trained with.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'video' %}"
    "{{ '<video>' }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_IMAGE_SIZE = {"smolvlm": 64, "llava_onevision": 32}


def _answer_words() -> list[str]:
    from hpc_train.synthetic_words import COLOURS, PITCHES

    return [*COLOURS, *PITCHES]


def _corpus() -> list[str]:
    from hpc_train.synthetic_words import vocabulary_text

    return vocabulary_text()


def smolvlm_processor(*, tile: int, image_seq_len: int, image_splitting: bool = False) -> ProcessorMixin:
    """An offline SmolVLM (Idefics3) processor: tiny BPE tokenizer, ``tile``-px tiles."""
    special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
               "<fake_token_around_image>", "<global-img>"]
    special += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = train_tokenizer(special, corpus=_corpus(), single_token_words=_answer_words(),
                                bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>")
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": tile * 2 if image_splitting else tile},
        max_image_size={"longest_edge": tile},
        do_image_splitting=image_splitting,
    )
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                             image_seq_len=image_seq_len, chat_template=SMOLVLM_CHAT_TEMPLATE)


def llava_onevision_processor(*, side: int, patch: int, pinpoints: list[list[int]]) -> ProcessorMixin:
    """An offline LLaVA-OneVision processor: tiny BPE tokenizer, ``side``-px tiles."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = train_tokenizer(special, corpus=_corpus(), single_token_words=_answer_words(),
                                bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
    return LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)


def build_tiny_smolvlm(*, image_splitting: bool = False, seed: int = 0,
                       width: int = 64) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny random SmolVLM (Idefics3): 64 px tiles, 4 tokens per tile, 2+2 layers."""
    tile, patch, scale = TINY_IMAGE_SIZE["smolvlm"], 16, 2
    processor = smolvlm_processor(tile=tile, image_seq_len=(tile // patch) ** 2 // scale**2,
                                  image_splitting=image_splitting)
    tokenizer = processor.tokenizer
    config = Idefics3Config(
        vision_config={"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": tile, "patch_size": patch},
        text_config=_text_config("llama", width, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    set_token_ids(model, tokenizer)
    return model, processor


def build_tiny_llava_onevision(*, seed: int = 0, width: int = 64) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny random LLaVA-OneVision: SigLIP 32 px / patch 8 (16 tokens per tile), Qwen2 LM."""
    side, patch = TINY_IMAGE_SIZE["llava_onevision"], 8
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    processor = llava_onevision_processor(side=side, patch=patch, pinpoints=pinpoints)
    tokenizer = processor.tokenizer
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": width,
                       "intermediate_size": 2 * width, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": side, "patch_size": patch,
                       "vision_use_head": False},  # as the published models: its output is unused
        text_config=_text_config("qwen2", width, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    set_token_ids(model, tokenizer)
    return model, processor


BUILDERS = {"smolvlm": build_tiny_smolvlm, "llava_onevision": build_tiny_llava_onevision}


def build_tiny(family: str, **kwargs: object) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny random model of ``family`` and its offline processor."""
    if family not in BUILDERS:
        raise ConfigError(f"no tiny model for family '{family}'. Fix: use one of {', '.join(BUILDERS)}")
    return BUILDERS[family](**kwargs)


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


def _text_config(model_type: str, width: int, tokenizer: Any) -> dict[str, Any]:
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
    architecture carries the published ones)."""
    image = tokenizer.convert_tokens_to_ids("<image>")
    video = tokenizer.convert_tokens_to_ids("<video>") if "<video>" in tokenizer.get_vocab() else None
    for name in ("image_token_id", "image_token_index"):
        if hasattr(config, name):
            setattr(config, name, image)
    if video is not None:
        for name in ("video_token_id", "video_token_index"):
            if hasattr(config, name):
                setattr(config, name, video)
    # The language model's config holds the special tokens (transformers deprecates
    # Idefics3's top-level pad_token_id in its favour; generation reads generation_config).
    text = getattr(config, "text_config", None) or config
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)


def preset_processor(name: str) -> ProcessorMixin:
    """An offline processor whose tiles and media tokens match the published architecture."""
    from hpc_train.models.presets import get_preset

    preset = get_preset(name)
    config = preset.build_config()
    vision = config.vision_config
    if preset.family == "smolvlm":
        return smolvlm_processor(tile=vision.image_size, image_seq_len=preset.tokens_per_image)
    return llava_onevision_processor(side=vision.image_size, patch=vision.patch_size,
                                     pinpoints=config.image_grid_pinpoints)


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
