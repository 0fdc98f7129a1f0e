"""SmolVLM2 (HuggingFaceTB/SmolVLM2-256M-Video-Instruct, -500M-Video-Instruct, -2.2B-Instruct):
transformers' SmolVLM classes, whose modules and parameter names are Idefics3's.

What differs from SmolVLM is how media reach the model. Images are split into tiles as there; a
video goes through the processor's video path: "You are provided the following series of {n}
frames from a {H:MM:SS} video." then, per frame, "Frame from MM:SS:" and one unsplit global
image, the timestamps the decoder's and the duration the file's. In the model a frame is one
image tile, so the batch layout, sequence parallelism and the vision cache are SmolVLM's.
"""

from __future__ import annotations

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

from hpc_train.models.families import smolvlm
from hpc_train.models.families.base import Family
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
    (no resampling), each with the time the decoder read it at, and the file's duration."""
    metadata = []
    for video in videos:
        fps = float(video.native_fps)
        metadata.append(VideoMetadata(
            total_num_frames=int(video.num_source_frames), fps=fps, duration=video.num_source_frames / fps,
            frames_indices=[round(float(t) * fps) for t in video.timestamps]))
    return {"video_metadata": metadata, "do_sample_frames": False}


FAMILY = Family(
    name="smolvlm2", title="SmolVLM2 (transformers' SmolVLM)", model_types=("smolvlm",),
    config_class=SmolVLMConfig, model_class=SmolVLMForConditionalGeneration,
    end_of_turn="<end_of_utterance>", image_token="<image>", video_token="<video>", video_kind="image",
    media_kinds=("image",), pixel_inputs=smolvlm.FAMILY.pixel_inputs,
    module_groups=smolvlm.IDEFICS3_GROUPS, vision_model="vision_model", language_model="text_model",
    layout=smolvlm.Idefics3Layout(), feature_encoders={"image": smolvlm.encode_tiles},
    share_vision=smolvlm.share_tiles, build_tiny=build_tiny, preset_processor=preset_processor,
    tile_tokens_fixed=True, video_inputs=video_inputs,
)

__all__ = ["FAMILY", "build_tiny", "processor", "video_inputs"]
