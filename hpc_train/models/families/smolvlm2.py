"""SmolVLM2 (HuggingFaceTB/SmolVLM2-256M-Video-Instruct, -500M-Video-Instruct, -2.2B-Instruct):
transformers' SmolVLM classes, whose modules and parameter names are Idefics3's.

What differs from SmolVLM is how media reach the model. Images are split into tiles as there; a
video goes through the processor's video path: "You are provided the following series of {n}
frames from a {H:MM:SS} video." then, per frame, "Frame from MM:SS:" and one unsplit global
image, the timestamps the decoder's and the duration the file's. In the model a frame is one
image tile, so the batch layout, sequence parallelism and the vision cache are SmolVLM's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from transformers import (
    ProcessorMixin,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
from transformers.video_utils import VideoMetadata

from hpc_train.errors import DataError
from hpc_train.models.families import smolvlm
from hpc_train.models.families.base import Family, Preset
from hpc_train.models.families.frames import video_processor_frames
from hpc_train.models.tiny import answer_words, corpus, seeded_model
from hpc_train.models.tokenizer import train_tokenizer

# The published folders' chat_template.json (all three checkpoints): it has no video item, so for
# a conversation with a video SmolVLMProcessor.apply_chat_template uses its own default template.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# The published preprocessor_config.json of every SmolVLM2 checkpoint: images resized to 4 tiles
# on their long edge (2048 px of 512-px tiles for 256M / 500M, 1536 of 384 for 2.2B) and split,
# LANCZOS; videos sampled at 1 fps, at most 64 frames, each frame one tile ("video_sampling").
PUBLISHED_EDGE_TILES = 4
PUBLISHED_VIDEO_FPS, PUBLISHED_MAX_FRAMES = 1, 64


def processor(*, tile: int, image_seq_len: int, edge_tiles: int = 2) -> ProcessorMixin:
    """An offline SmolVLM2 processor laid out as the published folders: tiny BPE tokenizer,
    ``tile``-px tiles, images split, frames one unsplit tile each."""
    tokenizer = train_tokenizer(smolvlm.SPECIAL_TOKENS, corpus=corpus(), single_token_words=answer_words(),
                                bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>")
    settings = smolvlm.image_processor_settings(tile, splitting=True, edge_tiles=edge_tiles)
    image_processor = SmolVLMImageProcessor(resample=1, **settings)
    video_processor = SmolVLMVideoProcessor(
        resample=1, max_image_size={"longest_edge": tile},
        video_sampling={"fps": PUBLISHED_VIDEO_FPS, "max_frames": PUBLISHED_MAX_FRAMES,
                        "video_size": {"longest_edge": tile}})
    return SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE)


def build_tiny(*, seed: int = 0, width: int = 64) -> tuple[Any, ProcessorMixin]:
    """A tiny random SmolVLM2: 64 px tiles, 4 tokens per tile, 2+2 layers, images split."""
    made = processor(tile=smolvlm.TINY_TILE, image_seq_len=smolvlm.tiny_tokens())
    config = smolvlm.tiny_config(SmolVLMConfig, made.tokenizer, width)
    return seeded_model(SmolVLMForConditionalGeneration, config, made.tokenizer, seed), made


def preset_processor(config: Any, tokens_per_image: int) -> ProcessorMixin:
    return processor(tile=config.vision_config.image_size, image_seq_len=tokens_per_image,
                     edge_tiles=PUBLISHED_EDGE_TILES)


def video_inputs(videos: Sequence[Any]) -> dict[str, Any]:
    """The processor's video arguments for decoded videos (``VideoFrames``): frames as sampled
    (no resampling), each with the time the decoder read it at, and the file's duration.

    SmolVLMProcessor stacks a sample's videos, padded to the longest, and writes that count
    into every video's intro line ("series of five frames" for a 3-frame video): a sample whose
    videos differ in frame count is refused rather than described wrongly."""
    counts = sorted({len(video.frames) for video in videos})
    if len(counts) > 1:
        raise DataError(f"its {len(videos)} videos have {' and '.join(map(str, counts))} frames; SmolVLM2's "
                        "processor would tell each the longest one's count",
                        fix=f"give every video the same count (data.video.sampling=uniform data.video.num_frames="
                            f"{counts[0]}), or one video per record")
    metadata = []
    for video in videos:
        fps = float(video.native_fps)
        metadata.append(VideoMetadata(
            total_num_frames=int(video.num_source_frames), fps=fps, duration=video.num_source_frames / fps,
            frames_indices=[round(float(t) * fps) for t in video.timestamps]))
    return {"video_metadata": metadata, "do_sample_frames": False}


def same_architecture(preset: Preset, hf_id: str) -> Preset:
    """A SmolVLM2 checkpoint whose config.json has ``preset``'s SmolVLM layer sizes and token ids."""
    return dataclasses.replace(preset, name=preset.name.replace("smolvlm-", "smolvlm2-"), family="smolvlm2",
                               hf_id=hf_id)


SMOLVLM_256M, SMOLVLM_500M = smolvlm.PRESETS[:2]

PRESETS = (
    # SmolVLM2 (transformers' SmolVLM classes, model_type "smolvlm"): the same modules and parameter
    # names as Idefics3, so the layer sizes are config.json's as for SmolVLM; what differs is the
    # processor (videos with timestamps, frames unsplit). Sources: each repo's config.json as quoted
    # on its hub commit pages (SmolVLM2-500M-Video-Instruct PR #4 adds num_hidden_layers 32;
    # SmolVLM2-2.2B-Instruct refs/pr/21: scale_factor 3, image_token_id 49190, text 2048/8192/24
    # layers, 8192 positions). The two small ones are SmolVLM-256M/500M's architecture (SmolLM2
    # text 576/1536/30/9/3 and 960/2560/32/15/5, vocab 49280, rope_theta 100000, SigLIP
    # base-patch16-512, scale_factor 4: 64 tokens a 512-px tile, processor_config image_seq_len 64).
    # The 2.2B's rope_theta (130000) comes from a copy of its config in public test specs.
    # Params: the names say 256M / 500M / 2.2B (no exact figure found); the totals match SmolVLM's
    # same-sized presets (the 2.2B: 2.25B).
    same_architecture(SMOLVLM_256M, "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"),
    same_architecture(SMOLVLM_500M, "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"),
    Preset(
        name="smolvlm2-2.2b", family="smolvlm2", hf_id="HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        published_params=2_250_000_000, image_size=384,
        tokens_per_image=smolvlm.tile_tokens(smolvlm.SIGLIP_SO400M_384, 3),
        tokens_per_video_frame=smolvlm.tile_tokens(smolvlm.SIGLIP_SO400M_384, 3),
        config_values=smolvlm.config_values(
            vision=dict(smolvlm.SIGLIP_SO400M_384),
            text={"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49280,
                  "max_position_embeddings": 8192, "rope_theta": 130_000.0},
            scale_factor=3, image_token_id=49190,
        ),
    ),
)


FAMILY = Family(
    name="smolvlm2", title="SmolVLM2 (transformers' SmolVLM)", model_types=("smolvlm",),
    config_class=SmolVLMConfig, model_class=SmolVLMForConditionalGeneration,
    end_of_turn="<end_of_utterance>", image_token="<image>", video_token="<video>", video_kind="image",
    media_kinds=("image",), pixel_inputs=smolvlm.FAMILY.pixel_inputs,
    module_groups=smolvlm.IDEFICS3_GROUPS, vision_model="vision_model", language_model="text_model",
    layout=smolvlm.Idefics3Layout(), feature_encoders={"image": smolvlm.encode_tiles},
    share_vision=smolvlm.share_tiles, build_tiny=build_tiny, preset_processor=preset_processor,
    presets=PRESETS, tile_tokens_fixed=True, video_inputs=video_inputs,
    prepare_frames=video_processor_frames,
)

__all__ = ["FAMILY", "PRESETS", "build_tiny", "processor", "video_inputs"]
