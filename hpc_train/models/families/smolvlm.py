"""SmolVLM (HuggingFaceTB/SmolVLM-*): transformers' Idefics3.

Images are split into tiles plus a global image (``do_image_splitting``), each tile
``image_seq_len`` tokens. Its chat template has no video item, so a video reaches it as a run of
images, one per frame; a frame is one unsplit tile unless ``data.video.split_frames`` asks.

Batch layout: ``pixel_values`` (B, N, 3, H, W) and ``pixel_attention_mask`` (B, N, H, W), N the
most tiles of any sample; padding tiles are all zero, which Idefics3 recognises and drops. A
packed row is one sample of all the row's tiles. ``tile_frames`` says which video frame each tile
shows (host bookkeeping for sequence parallelism: the rank that decoded a frame encodes it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    ProcessorMixin,
)
from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor

from hpc_train.models.families.base import Family, MediaLayout, Preset
from hpc_train.models.media_keys import IMAGE_TILE, PADDING_TILE, TILE_FRAMES
from hpc_train.models.tiny import answer_words, corpus, seeded_model, text_config
from hpc_train.models.tokenizer import train_tokenizer
from hpc_train.models.vision_share import routed, rows_of

# Same layout as the published SmolVLM template: "User:<image>question<end_of_utterance>\n".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
TINY_TILE, TINY_PATCH, TINY_SCALE = 64, 16, 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                  "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]


class Idefics3Layout(MediaLayout):
    shared_by = TILE_FRAMES

    def sample(self, processor_out: Any) -> dict[str, torch.Tensor]:
        if "pixel_values" not in processor_out:
            return {}
        return {"pixel_values": processor_out["pixel_values"][0],
                "pixel_attention_mask": processor_out["pixel_attention_mask"][0].bool()}

    def batch(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        tiles = [s.media.get("pixel_values") for s in samples]
        if all(t is None for t in tiles):
            return {}
        present = [t for t in tiles if t is not None]
        n = max(t.shape[0] for t in present)
        height, width = max(t.shape[-2] for t in present), max(t.shape[-1] for t in present)
        pixels = torch.zeros(len(samples), n, present[0].shape[1], height, width, dtype=present[0].dtype)
        mask = torch.zeros(len(samples), n, height, width, dtype=torch.bool)
        frames = torch.tensor([PADDING_TILE, 0]).repeat(len(samples), n, 1)
        for i, s in enumerate(samples):
            if "pixel_values" not in s.media:
                continue
            t, m = s.media["pixel_values"], s.media["pixel_attention_mask"]
            pixels[i, : t.shape[0], :, : t.shape[-2], : t.shape[-1]] = t
            mask[i, : m.shape[0], : m.shape[-2], : m.shape[-1]] = m
            frames[i, : t.shape[0]] = _tile_frames(s)
        real = [s.media["pixel_attention_mask"] for s in samples if "pixel_values" in s.media]
        return {**_unless_full({"pixel_values": pixels, "pixel_attention_mask": mask}, real, (height, width)),
                TILE_FRAMES: frames}

    def packed_row(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        tiles = [s.media["pixel_values"] for s in samples if "pixel_values" in s.media]
        if not tiles:
            return {}
        masks = [s.media["pixel_attention_mask"] for s in samples if "pixel_values" in s.media]
        frames = torch.cat([_tile_frames(s) for s in samples if "pixel_values" in s.media])[None]
        return {**_unless_full({"pixel_values": torch.cat(tiles)[None], "pixel_attention_mask": torch.cat(masks)[None]},
                               masks), TILE_FRAMES: frames}


def _tile_frames(sample: Any) -> torch.Tensor:
    """Which video frame each tile of ``sample`` shows (all images when the encoder did not say)."""
    if TILE_FRAMES in sample.media:
        return sample.media[TILE_FRAMES]
    return torch.tensor([IMAGE_TILE, 0]).repeat(len(sample.media["pixel_values"]), 1)


def _unless_full(media: dict[str, torch.Tensor], masks: Sequence[torch.Tensor],
                 size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """``media`` without ``pixel_attention_mask`` when every real tile's mask is all true at
    the batch's tile ``size`` (Idefics3 drops the all-zero padding tiles before it reads a
    mask, and makes an all-true one when given none): the model then has nothing to mask,
    which the host knows here for free."""
    if all(bool(m.all()) and (size is None or tuple(m.shape[-2:]) == size) for m in masks):
        media = {k: v for k, v in media.items() if k != "pixel_attention_mask"}
    return media


def share_tiles(inner: torch.nn.Module, group: Any) -> None:
    """Each rank encodes its tiles (a video frame's on the rank that decoded it, images' evenly)."""
    original = inner.get_image_features

    def get_image_features(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                           **kwargs: Any) -> Any:
        out = original(pixel_values, pixel_attention_mask, **kwargs)  # in training: this rank's tiles only
        if inner.training:
            out.pooler_output = [routed(torch.cat(list(out.pooler_output)), rows_of("image"), group)]
        return out

    inner.get_image_features = get_image_features


def encode_tiles(inner: Any, pixels: dict[str, Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """The connector's rows of a batch's tiles, in token order."""
    out = inner.get_image_features(pixels["pixel_values"], pixels["pixel_attention_mask"], return_dict=True)
    return torch.cat(list(out.pooler_output))


def image_processor_settings(tile: int, *, splitting: bool, edge_tiles: int = 2) -> dict[str, Any]:
    """Images resized to ``edge_tiles`` tiles on their long edge, then cut into tiles (the published
    folders resize to 4; tiny models to 2, so that a test image costs at most 4 tiles and a global one)."""
    return {"size": {"longest_edge": tile * edge_tiles if splitting else tile},
            "max_image_size": {"longest_edge": tile}, "do_image_splitting": splitting}


def processor(*, tile: int, image_seq_len: int, image_splitting: bool = False, edge_tiles: int = 2) -> ProcessorMixin:
    """An offline SmolVLM (Idefics3) processor: tiny BPE tokenizer, ``tile``-px tiles."""
    tokenizer = train_tokenizer(SPECIAL_TOKENS, corpus=corpus(), single_token_words=answer_words(),
                                bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>")
    settings = image_processor_settings(tile, splitting=image_splitting, edge_tiles=edge_tiles)
    image_processor = Idefics3ImageProcessor(**settings)
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                             image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE)


def tiny_config(config_class: type, tokenizer: Any, width: int) -> Any:
    """A 2+2-layer Idefics3-shaped config: 64 px tiles of 16 px patches, 4 tokens a tile."""
    return config_class(
        vision_config={"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": TINY_TILE, "patch_size": TINY_PATCH},
        text_config=text_config("llama", width, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=TINY_SCALE,
        tie_word_embeddings=False,
    )


def tiny_tokens() -> int:
    return (TINY_TILE // TINY_PATCH) ** 2 // TINY_SCALE**2


def build_tiny(*, image_splitting: bool = False, seed: int = 0, width: int = 64) -> tuple[Any, ProcessorMixin]:
    """A tiny random SmolVLM (Idefics3): 64 px tiles, 4 tokens per tile, 2+2 layers."""
    made = processor(tile=TINY_TILE, image_seq_len=tiny_tokens(), image_splitting=image_splitting)
    config = tiny_config(Idefics3Config, made.tokenizer, width)
    return seeded_model(Idefics3ForConditionalGeneration, config, made.tokenizer, seed), made


def preset_processor(config: Any, tokens_per_image: int) -> ProcessorMixin:
    """As the published folders' preprocessor_config.json: images resized to 4 tiles on the long edge
    (2048 px of 512-px tiles for 256M / 500M, 1536 of 384 for 2.2B) and split."""
    return processor(tile=config.vision_config.image_size, image_seq_len=tokens_per_image, image_splitting=True,
                     edge_tiles=4)



def config_values(*, vision: dict[str, Any], text: dict[str, Any], scale_factor: int,
             image_token_id: int) -> Mapping[str, Any]:
    """Idefics3Config / SmolVLMConfig keyword arguments; the text model of every SmolVLM is a Llama."""
    return MappingProxyType({
        "vision_config": vision,
        "text_config": {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
                        "tie_word_embeddings": False, **text},
        "scale_factor": scale_factor,
        "image_token_id": image_token_id,
        # Every SmolVLM checkpoint keeps a separate lm_head (the 256M/500M ones too, although
        # their SmolLM2 text models tie it): the published totals only add up untied.
        "tie_word_embeddings": False,
    })


# SmolVLM-256M/500M: SigLIP base-patch16-512, 93M parameters ("google/siglip-base-patch16-512"
# in the model cards' base_model). 512 px tiles of 16 px patches.
SIGLIP_B16_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "image_size": 512, "patch_size": 16}

# SmolVLM 2.2B: SigLIP so400m-patch14-384 with all 27 layers (Idefics3 has no pooling head).
SIGLIP_SO400M_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                     "num_attention_heads": 16, "image_size": 384, "patch_size": 14}


def tile_tokens(vision: Mapping[str, int], scale_factor: int) -> int:
    """Tokens per tile after the pixel shuffle: (side / patch)^2 / scale^2."""
    return (vision["image_size"] // vision["patch_size"]) ** 2 // scale_factor**2


PRESETS = (
    # HuggingFaceTB/SmolVLM-256M-Instruct, config.json: vision 768/3072/12 layers/12 heads
    # @ 512 px patch 16; text SmolLM2-135M: Llama 576/1536/30 layers, 9 heads, 3 kv heads,
    # vocab 49280, rope_theta 100000, 8192 positions; scale_factor 4 (the card's "64 visual
    # tokens per 512x512 patch"), image_token_id 49190 "<image>", tie_word_embeddings false.
    # Params: the model card and page say 256M.
    Preset(
        name="smolvlm-256m", family="smolvlm", hf_id="HuggingFaceTB/SmolVLM-256M-Instruct",
        published_params=256_000_000, image_size=512,
        tokens_per_image=tile_tokens(SIGLIP_B16_512, 4),
        tokens_per_video_frame=tile_tokens(SIGLIP_B16_512, 4),
        config_values=config_values(
            vision=dict(SIGLIP_B16_512),
            text={"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                  "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49280,
                  "max_position_embeddings": 8192, "rope_theta": 100_000.0},
            scale_factor=4, image_token_id=49190,
        ),
    ),
    # HuggingFaceTB/SmolVLM-500M-Instruct, config.json: same vision tower and connector layout
    # as 256M; text SmolLM2-360M: Llama 960/2560/32 layers, 15 heads, 5 kv heads, vocab 49280,
    # rope_theta 100000, 8192 positions; scale_factor 4, image_token_id 49190, untied head.
    # Params: the card, its name and the release blog (hf.co/blog/smolervlm) say 500M; the
    # exact safetensors total is ~1.5% above that (the name rounds down).
    Preset(
        name="smolvlm-500m", family="smolvlm", hf_id="HuggingFaceTB/SmolVLM-500M-Instruct",
        published_params=500_000_000, image_size=512,
        tokens_per_image=tile_tokens(SIGLIP_B16_512, 4),
        tokens_per_video_frame=tile_tokens(SIGLIP_B16_512, 4),
        config_values=config_values(
            vision=dict(SIGLIP_B16_512),
            text={"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                  "num_attention_heads": 15, "num_key_value_heads": 5, "vocab_size": 49280,
                  "max_position_embeddings": 8192, "rope_theta": 100_000.0},
            scale_factor=4, image_token_id=49190,
        ),
    ),
    # HuggingFaceTB/SmolVLM-Instruct (the "SmolVLM 2B / 2.2B"), config.json: vision SigLIP
    # so400m 1152/4304/27 layers/16 heads @ 384 px patch 14; text SmolLM2-1.7B: Llama
    # 2048/8192/24 layers, 32 heads (no GQA), vocab 49155, rope_theta 273768 and 16384
    # positions (its long-context extension); scale_factor 3 (81 tokens a tile),
    # image_token_id 49153, untied head. Params: the card says "2B"/"2.2B"; the model page
    # shows 2.25B, which is what we check (2.2B would be 2.1% off the real total).
    Preset(
        name="smolvlm-2.2b", family="smolvlm", hf_id="HuggingFaceTB/SmolVLM-Instruct",
        published_params=2_250_000_000, image_size=384,
        tokens_per_image=tile_tokens(SIGLIP_SO400M_384, 3),
        tokens_per_video_frame=tile_tokens(SIGLIP_SO400M_384, 3),
        config_values=config_values(
            vision=dict(SIGLIP_SO400M_384),
            text={"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49155,
                  "max_position_embeddings": 16384, "rope_theta": 273_768.0},
            scale_factor=3, image_token_id=49153,
        ),
    ),
)

IDEFICS3_GROUPS = {"vision": ("model.vision_model.",), "connector": ("model.connector.",),
                   "llm": ("model.text_model.",), "head": ("lm_head.",)}

FAMILY = Family(
    name="smolvlm", title="SmolVLM (transformers' Idefics3)", model_types=("idefics3",),
    config_class=Idefics3Config, model_class=Idefics3ForConditionalGeneration,
    end_of_turn="<end_of_utterance>", image_token="<image>", video_token=None, video_kind="image",
    media_kinds=("image",), pixel_inputs={"image": ("pixel_values", "pixel_attention_mask")},
    module_groups=IDEFICS3_GROUPS, vision_model="vision_model", language_model="text_model",
    layout=Idefics3Layout(), feature_encoders={"image": encode_tiles}, share_vision=share_tiles,
    build_tiny=build_tiny, preset_processor=preset_processor, presets=PRESETS, tile_tokens_fixed=True,
)

__all__ = ["FAMILY", "IDEFICS3_GROUPS", "PRESETS", "SIGLIP_B16_512", "SIGLIP_SO400M_384", "Idefics3Layout", "build_tiny",
           "config_values", "encode_tiles", "image_processor_settings", "processor", "share_tiles", "tile_tokens",
           "tiny_config", "tiny_tokens"]
