"""LLaVA-OneVision (llava-hf/llava-onevision-qwen2-*-ov-hf): transformers' LlavaOnevision.

A lone image is tiled on its anyres grid; the images of a multi-image sample are not. Videos
have their own path: frames pooled 2x2 and one newline after the video.

Batch layout: images of all samples concatenated, ``pixel_values`` (I, P, 3, h, w) with P the
most anyres patches, ``image_sizes`` (I, 2) and ``batch_num_images`` (B,); videos concatenated
as ``pixel_values_videos`` (V, F, 3, h, w), so they need one frame count. ``image_rows`` says
how many feature rows each image makes (host bookkeeping for sequence parallelism).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    ProcessorMixin,
)
from transformers.models.llava_onevision.image_processing_llava_onevision import (
    LlavaOnevisionImageProcessor,
)
from transformers.models.llava_onevision.video_processing_llava_onevision import (
    LlavaOnevisionVideoProcessor,
)

from hpc_train.errors import DataError
from hpc_train.models.families.base import Family, MediaLayout, Preset
from hpc_train.models.families.frames import video_processor_frames
from hpc_train.models.media_keys import IMAGE_ROWS
from hpc_train.models.tiny import answer_words, corpus, seeded_model, text_config
from hpc_train.models.tokenizer import train_tokenizer
from hpc_train.models.vision_share import routed, rows_of

# Qwen-style turns, as LLaVA-OneVision's language model was trained with.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'video' %}"
    "{{ '<video>' }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SIDE, TINY_PATCH = 32, 8


class LlavaOneVisionLayout(MediaLayout):
    shared_by = IMAGE_ROWS

    def sample(self, processor_out: Any) -> dict[str, torch.Tensor]:
        media: dict[str, torch.Tensor] = {}
        if "pixel_values" in processor_out:
            media["pixel_values"] = processor_out["pixel_values"]
            media["image_sizes"] = processor_out["image_sizes"]
        if "pixel_values_videos" in processor_out:
            media["pixel_values_videos"] = processor_out["pixel_values_videos"]
        return media

    def batch(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        return llava_onevision_media(samples)

    def packed_row(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        return llava_onevision_media(samples, packed=True)


def llava_onevision_media(samples: Sequence[Any], *, packed: bool = False) -> dict[str, torch.Tensor]:
    """The media of several samples in LLaVA-OneVision's layout (padded rows and packed rows alike).

    ``batch_num_images`` is per sample: LLaVA-OneVision tiles a lone image (anyres) but not
    the images of a multi-image sample, and the processor counted tokens that way.
    """
    out: dict[str, torch.Tensor] = {}
    images = [s.media["pixel_values"] for s in samples if "pixel_values" in s.media]
    if images:
        patches = max(t.shape[1] for t in images)
        out["pixel_values"] = torch.cat(
            [F.pad(t, (0, 0, 0, 0, 0, 0, 0, patches - t.shape[1])) for t in images])
        out["image_sizes"] = torch.cat([s.media["image_sizes"] for s in samples if "image_sizes" in s.media])
        out["batch_num_images"] = torch.tensor(
            [s.media["pixel_values"].shape[0] if "pixel_values" in s.media else 0 for s in samples])
        if all(IMAGE_ROWS in s.media for s in samples if "pixel_values" in s.media):
            out[IMAGE_ROWS] = torch.cat([s.media[IMAGE_ROWS] for s in samples if "pixel_values" in s.media])
    videos = [s.media["pixel_values_videos"] for s in samples if "pixel_values_videos" in s.media]
    if videos:
        frames = {v.shape[1] for v in videos}
        if len(frames) > 1:
            ids = [s.id for s in samples if "pixel_values_videos" in s.media]
            raise DataError(
                f"videos with different frame counts {sorted(frames)} in one {'packed row' if packed else 'batch'} "
                f"(samples {ids}); LLaVA-OneVision stacks them",
                fix=f"data.video.sampling=uniform data.video.num_frames={min(frames)} (one count for every video), "
                    + ("or data.packing=false with train.micro_batch_size=1" if packed else "or micro_batch_size=1"))
        out["pixel_values_videos"] = torch.cat(videos)
    return out


def share_vision(inner: torch.nn.Module, group: Any) -> None:
    """Each rank encodes its share of every video's frames and of the samples' images."""
    inner.get_video_features = _shared_frames(inner, inner.get_video_features, group)
    inner.get_image_features = _shared_images(inner, inner.get_image_features, group)


def _shared_frames(inner: torch.nn.Module, original: Callable[..., Any], group: Any) -> Callable[..., Any]:
    def get_video_features(pixel_values_videos: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = original(pixel_values_videos, *args, **kwargs)  # in training: this rank's frames as one video
        if inner.training:
            rows = rows_of("video")
            pooled = out.pooler_output[0]  # the frames' rows, then one newline row
            out.pooler_output = routed(pooled[rows.local_order.to(pooled.device)], rows, group)[None]
        return out

    return get_video_features


def _shared_images(inner: torch.nn.Module, original: Callable[..., Any], group: Any) -> Callable[..., Any]:
    def get_image_features(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if inner.training:
            rows, local = rows_of("image"), torch.cat(list(out.pooler_output))
            if rows.routing is None:  # encoded whole here: keep the slice's rows
                out.pooler_output = [local[rows.wanted[rows.rank].to(local.device)]]
            else:
                out.pooler_output = [routed(local, rows, group)]
        return out

    return get_image_features


_OPTIONS = ("vision_feature_layer", "vision_feature_select_strategy")


def encode_images(inner: Any, pixels: dict[str, Any], kwargs: dict[str, Any]) -> torch.Tensor:
    options = {name: kwargs.get(name) for name in (*_OPTIONS, "vision_aspect_ratio")}
    out = inner.get_image_features(pixels["pixel_values"], pixels["image_sizes"],
                                   batch_num_images=pixels["batch_num_images"], return_dict=True, **options)
    return torch.cat(list(out.pooler_output))


def encode_videos(inner: Any, pixels: dict[str, Any], kwargs: dict[str, Any]) -> torch.Tensor:
    options = {name: kwargs.get(name) for name in _OPTIONS}
    return inner.get_video_features(pixels["pixel_values_videos"], return_dict=True, **options).pooler_output.flatten(0, 1)


def processor(*, side: int, patch: int, pinpoints: list[list[int]]) -> ProcessorMixin:
    """An offline LLaVA-OneVision processor: tiny BPE tokenizer, ``side``-px tiles."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = train_tokenizer(special, corpus=corpus(), single_token_words=answer_words(),
                                bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    image_processor = LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
    return LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)


def build_tiny(*, seed: int = 0, width: int = 64) -> tuple[Any, ProcessorMixin]:
    """A tiny random LLaVA-OneVision: SigLIP 32 px / patch 8 (16 tokens per tile), Qwen2 LM."""
    side = TINY_SIDE
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    made = processor(side=side, patch=TINY_PATCH, pinpoints=pinpoints)
    tokenizer = made.tokenizer
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": width,
                       "intermediate_size": 2 * width, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": side, "patch_size": TINY_PATCH,
                       "vision_use_head": False},  # as the published models: its output is unused
        text_config=text_config("qwen2", width, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    return seeded_model(LlavaOnevisionForConditionalGeneration, config, tokenizer, seed), made


def preset_processor(config: Any, tokens_per_image: int) -> ProcessorMixin:
    vision = config.vision_config
    return processor(side=vision.image_size, patch=vision.patch_size, pinpoints=config.image_grid_pinpoints)



# LLaVA-OneVision: the same SigLIP so400m with its last layer and pooling head dropped
# (transformers src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py:
# ``num_hidden_layers=26  # drop the last layer``, ``vision_use_head=False``).
SIGLIP_26_LAYERS = {"model_type": "siglip_vision_model", "hidden_size": 1152,
                    "intermediate_size": 4304, "num_hidden_layers": 26, "num_attention_heads": 16,
                    "image_size": 384, "patch_size": 14, "vision_use_head": False}

# anyres_max_9 grid: every (h, w) with h, w in {384, 768, ..., 2304}, row-major, as listed in
# the llava-hf configs (and transformers' LlavaOnevisionConfig default).
ANYRES_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def config_values(*, text: dict[str, Any], tie: bool) -> Mapping[str, Any]:
    """LlavaOnevisionConfig keyword arguments; the text model is Qwen2-{0.5B,7B}-Instruct.

    The llava-hf conversion adds ``<image>`` (151646) and ``<video>`` (151647) to the Qwen2
    tokenizer and pads the embedding to vocab + 2 rounded up to a multiple of 64, which gives
    the published vocab sizes (151936 -> 152000, 152064 -> 152128).
    """
    return MappingProxyType({
        "vision_config": dict(SIGLIP_26_LAYERS),
        "text_config": {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6,
                        "rope_theta": 1_000_000.0, "max_position_embeddings": 32768,
                        "tie_word_embeddings": tie, **text},
        "image_token_index": 151646,
        "video_token_index": 151647,
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": ANYRES_PINPOINTS,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": tie,
    })


TILE_TOKENS = (SIGLIP_26_LAYERS["image_size"] // SIGLIP_26_LAYERS["patch_size"]) ** 2  # 729
# Video frames are bilinearly pooled 2x2: ceil(27 / 2)^2 = 196 tokens a frame.
FRAME_TOKENS = math.ceil(math.isqrt(TILE_TOKENS) / 2) ** 2

PRESETS = (
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf, config.json, as written by transformers'
    # convert_llava_onevision_weights_to_hf.py from lmms-lab/llava-onevision-qwen2-0.5b-ov:
    # vision above; text Qwen/Qwen2-0.5B-Instruct config.json: 896/4864/24 layers, 14 heads,
    # 2 kv heads, rope_theta 1e6, 32768 positions, tied embeddings; vocab 152000 after the
    # conversion. Params: the model page shows 894M (tied embeddings counted once).
    Preset(
        name="llava-onevision-0.5b", family="llava_onevision",
        hf_id="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        published_params=894_000_000, image_size=384,
        tokens_per_image=TILE_TOKENS, tokens_per_video_frame=FRAME_TOKENS,
        config_values=config_values(
            text={"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                  "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 152000},
            tie=True,
        ),
    ),
    # llava-hf/llava-onevision-qwen2-7b-ov-hf, config.json (same conversion, from
    # lmms-lab/llava-onevision-qwen2-7b-ov): text Qwen/Qwen2-7B-Instruct config.json:
    # 3584/18944/28 layers, 28 heads, 4 kv heads, rope_theta 1e6, 32768 positions, untied
    # head; vocab 152128 after the conversion. Params: the model page shows 8.03B.
    Preset(
        name="llava-onevision-7b", family="llava_onevision",
        hf_id="llava-hf/llava-onevision-qwen2-7b-ov-hf",
        published_params=8_030_000_000, image_size=384,
        tokens_per_image=TILE_TOKENS, tokens_per_video_frame=FRAME_TOKENS,
        config_values=config_values(
            text={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                  "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152128},
            tie=False,
        ),
    ),
)


FAMILY = Family(
    name="llava_onevision", title="LLaVA-OneVision", model_types=("llava_onevision",),
    config_class=LlavaOnevisionConfig, model_class=LlavaOnevisionForConditionalGeneration,
    end_of_turn="<|im_end|>", image_token="<image>", video_token="<video>", video_kind="video",
    media_kinds=("image", "video"),
    pixel_inputs={"image": ("pixel_values", "image_sizes", "batch_num_images"),
                  "video": ("pixel_values_videos", "image_sizes_videos")},
    module_groups={"vision": ("model.vision_tower.",),
                   "connector": ("model.multi_modal_projector.", "model.image_newline"),
                   "llm": ("model.language_model.",), "head": ("lm_head.",)},
    vision_model="vision_tower", language_model="language_model",
    layout=LlavaOneVisionLayout(), feature_encoders={"image": encode_images, "video": encode_videos},
    share_vision=share_vision, build_tiny=build_tiny, preset_processor=preset_processor, presets=PRESETS,
    prepare_frames=video_processor_frames,
)

__all__ = ["FAMILY", "PRESETS", "LlavaOneVisionLayout", "build_tiny", "llava_onevision_media", "processor"]
