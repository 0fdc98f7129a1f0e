"""LLaVA-OneVision-1.5 (lmms-lab/LLaVA-OneVision-1.5-4B-Instruct, -8B-Instruct): RICE-ViT +
Qwen3 (:mod:`hpc_train.models.llava_ov_1_5`), fed by transformers' ``Qwen2_5_VLProcessor`` as the
published folder configures it (``temporal_patch_size`` 1).

An image is cut into 14-px patches at its own size (rounded to 28 px, within the processor's
pixel budget) and costs ``t·h·w / 4`` tokens; a video's frames are each such an image (one
segment each in the tower). The chat template is Qwen2-VL's ChatML, with its default system
prompt.

Batch layout: the patch rows of all samples' images concatenated, ``pixel_values`` (rows, 588)
with ``image_grid_thw`` (images, 3), and the same for videos (``pixel_values_videos``,
``video_grid_thw``); padded batches and packed rows alike, videos of any frame counts. The grids
stay on the host (the tower reads them there), and sequence parallelism shares the encoding by
them: whole images, and each video's frames in contiguous shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from transformers import ProcessorMixin, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from hpc_train.models.families.base import Family, MediaLayout, Preset
from hpc_train.models.families.frames import qwen2_vl_frames
from hpc_train.models.llava_ov_1_5 import (
    LlavaOnevision15Config,
    LlavaOnevision15ForConditionalGeneration,
)
from hpc_train.models.media_keys import GRID_THW, MEDIA_GRIDS
from hpc_train.models.tiny import answer_words, corpus, seeded_model
from hpc_train.models.tokenizer import train_tokenizer
from hpc_train.models.vision_share import routed, rows_of
from profiling.flops import PLAN_SIDE

# The published folder's chat_template.json (Qwen/Qwen2.5-VL-7B-Instruct's, which the checkpoint ships).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PATCH, MERGE = 14, 2
UNIT = PATCH * MERGE  # images are resized to multiples of one merged window
# The published preprocessor_config.json: Qwen2.5-VL's with temporal_patch_size 1 and
# max_pixels 1600*1600 (min_pixels 56*56); the video processor reads the same file.
PUBLISHED_PIXELS = (56 * 56, 1600 * 1600)
TINY_PIXELS = (56 * 56, 112 * 112)
"""The tiny models' budget: a 64-px test picture is 56 px (4 tokens), a larger one at most 16."""

MEDIA_KEYS = MEDIA_GRIDS


class GridLayout(MediaLayout):
    shared_by = GRID_THW

    def sample(self, processor_out: Any) -> dict[str, torch.Tensor]:
        return {key: processor_out[key] for keys in MEDIA_KEYS.values() for key in keys if key in processor_out}

    def batch(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        out = {}
        for keys in MEDIA_KEYS.values():
            for key in keys:
                parts = [s.media[key] for s in samples if key in s.media]
                if parts:
                    out[key] = torch.cat(parts)
        return out

    def packed_row(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        return self.batch(samples)


def share_vision(inner: torch.nn.Module, group: Any) -> None:
    """Each rank encodes the images and video frames the batch's split left it (see
    :func:`hpc_train.data.decoding.media_share.split_media`); the rows go where their tokens are."""
    for kind in MEDIA_KEYS:
        name = f"get_{kind}_features"
        setattr(inner, name, _shared(inner, getattr(inner, name), kind, group))


def _shared(inner: torch.nn.Module, original: Callable[..., Any], kind: str, group: Any) -> Callable[..., Any]:
    def features(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if inner.training:
            rows, local = rows_of(kind), torch.cat(list(out.pooler_output))
            if rows.routing is None:  # encoded whole on every rank: keep the slice's rows
                out.pooler_output = [local[rows.wanted[rows.rank].to(local.device)]]
            else:
                out.pooler_output = [routed(local, rows, group)]
        return out

    return features


def encoder(kind: str) -> Callable[[Any, dict[str, Any], dict[str, Any]], torch.Tensor]:
    """The frozen-vision cache's encoder of ``kind``: the tower and merger's rows, in order."""
    pixels_key, grid_key = MEDIA_KEYS[kind]

    def encode(inner: Any, pixels: dict[str, Any], _: dict[str, Any]) -> torch.Tensor:
        method = getattr(inner, f"get_{kind}_features")
        return torch.cat(list(method(pixels[pixels_key], pixels[grid_key]).pooler_output))

    return encode


def processor(*, pixels: tuple[int, int]) -> ProcessorMixin:
    """An offline LLaVA-OneVision-1.5 processor: tiny BPE tokenizer with Qwen's special tokens,
    Qwen2-VL's image and video processors with one frame a temporal patch, images and frames
    within ``pixels`` (min, max) pixels."""
    tokenizer = train_tokenizer(SPECIAL_TOKENS, corpus=corpus(), single_token_words=answer_words(),
                                bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    low, high = pixels
    options = {"patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": 1, "min_pixels": low,
               "max_pixels": high}
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**options), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**options), chat_template=CHAT_TEMPLATE)


def blank_side(processor: Any) -> int:
    """The side of the smallest picture the processor keeps whole: its minimum pixel budget."""
    low = processor.image_processor.size["shortest_edge"]
    return max(UNIT, math.isqrt(low) // UNIT * UNIT)


def tiny_config(tokenizer: Any, width: int) -> LlavaOnevision15Config:
    """A 2+2-layer model of the published shape: RICE-ViT patch 14 / merge 2, Qwen3 with q/k norms."""
    ids = tokenizer.convert_tokens_to_ids
    return LlavaOnevision15Config(
        vision_config={"depth": 2, "embed_dim": width, "hidden_size": width, "intermediate_size": 2 * width,
                       "num_heads": 2, "patch_size": PATCH, "spatial_merge_size": MERGE},
        text_config={"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": width // 4,
                     "vocab_size": len(tokenizer), "max_position_embeddings": 4096, "rope_theta": 1_000_000.0,
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "tie_word_embeddings": False},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def build_tiny(*, seed: int = 0, width: int = 64) -> tuple[Any, ProcessorMixin]:
    """A tiny random LLaVA-OneVision-1.5 and its processor (images 56-112 px, frames alike)."""
    made = processor(pixels=TINY_PIXELS)
    model = seeded_model(LlavaOnevision15ForConditionalGeneration, tiny_config(made.tokenizer, width),
                         made.tokenizer, seed)
    return model, made


def preset_processor(config: Any, tokens_per_image: int) -> ProcessorMixin:
    return processor(pixels=PUBLISHED_PIXELS)


# Both published sizes share the RICE-ViT tower (rice_vit vision_config: depth 24, width 1024,
# 16 heads, patch 14, merge 2) and a Qwen3 language model with 36 layers, 32 query / 8 KV heads
# of 128, vocab 151936 and an untied head; the widths are the base models' (Qwen3-8B:
# 4096 / 12288; Qwen3-4B-Instruct-2507, the 4B card's base_model: 2560 / 9728). Sources: the
# reference configuration_llavaonevision1_5.py and its conversion configs
# (EvolvingLMMs-Lab/LLaVA-OneVision-1.5 @ a5eb942, ds/ and tools/convert_checkpoint/config/), the
# test fixture of transformers PR #48896. rope_theta / positions: Qwen3-8B 1e6 / 32768; the 4B's
# 5e6 / 262144 are the reference config's defaults (the hub files were not read).
def config_values(*, hidden: int, intermediate: int, rope_theta: float, positions: int) -> Mapping[str, Any]:
    return MappingProxyType({
        "vision_config": {"depth": 24, "embed_dim": 1024, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_heads": 16, "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 1,
                          "hidden_act": "gelu", "layer_norm_eps": 1e-5, "text_hidden_size": hidden},
        "text_config": {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                        "hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False,
                        "rope_theta": rope_theta, "max_position_embeddings": positions,
                        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645},
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
    })


# FLOPs counting's planning square, 448 px: 32×32 patches, 256 tokens (the published processor
# keeps an image at its own size within 56²…1600² pixels, so tokens grow with the picture).
PLAN_TOKENS = (PLAN_SIDE // PATCH) ** 2 // MERGE**2

PRESETS = (
    # published_params: summed from the tensor shapes the reference code and its conversion
    # configs give the checkpoint (not from our modules, which the preset test counts against
    # them); the model cards say only "4B" / "8B". 4B: tower 302,914,592 + merger 27,271,680 +
    # Qwen3 with its untied head 4,411,424,256 = 4,741,610,528.
    Preset(name="llava-onevision-1.5-4b", family="llava_onevision_1_5",
           hf_id="lmms-lab/LLaVA-OneVision-1.5-4B-Instruct", published_params=4_741_610_528, image_size=PLAN_SIDE,
           tokens_per_image=PLAN_TOKENS, tokens_per_video_frame=PLAN_TOKENS,
           config_values=config_values(hidden=2560, intermediate=9728, rope_theta=5_000_000.0, positions=262144)),
    # 8B: tower 302,914,592 + merger 33,564,672 + Qwen3-8B with its head 8,190,735,360 = 8,527,214,624.
    Preset(name="llava-onevision-1.5-8b", family="llava_onevision_1_5",
           hf_id="lmms-lab/LLaVA-OneVision-1.5-8B-Instruct", published_params=8_527_214_624, image_size=PLAN_SIDE,
           tokens_per_image=PLAN_TOKENS, tokens_per_video_frame=PLAN_TOKENS,
           config_values=config_values(hidden=4096, intermediate=12288, rope_theta=1_000_000.0, positions=32768)),
)


FAMILY = Family(
    name="llava_onevision_1_5", title="LLaVA-OneVision-1.5", model_types=("llavaonevision1_5",),
    config_class=LlavaOnevision15Config, model_class=LlavaOnevision15ForConditionalGeneration,
    end_of_turn="<|im_end|>", image_token="<|image_pad|>", video_token="<|video_pad|>", video_kind="video",
    media_kinds=("image", "video"), pixel_inputs=MEDIA_KEYS,
    module_groups={"vision": ("visual.patch_embed.", "visual.class_embedding", "visual.class_pos_emb",
                              "visual.pre_layernorm.", "visual.blocks.", "visual.inv_freq"),
                   "connector": ("visual.merger.",), "llm": ("model.",), "head": ("lm_head.",)},
    vision_model="visual", language_model="model",
    layout=GridLayout(), feature_encoders={kind: encoder(kind) for kind in MEDIA_KEYS},
    share_vision=share_vision, build_tiny=build_tiny, preset_processor=preset_processor, presets=PRESETS,
    strict_weights=True, blank_side=blank_side,
    prepare_frames=qwen2_vl_frames,
)

__all__ = ["FAMILY", "PRESETS", "GridLayout", "build_tiny", "processor"]
