"""Published SmolVLM / LLaVA-OneVision architectures, built offline with random weights.

Each preset holds the layer sizes of a released checkpoint's ``config.json``, so a model can
be built for planning (on the ``meta`` device: no memory), for throughput benchmarks, or as a
randomly initialised starting point, without anything being downloaded. ``hf_id`` only says
where the trained weights live; it is never fetched.

Each preset is built with its family's classes (``Family.config_class`` / ``model_class``):
SmolVLM as transformers' Idefics3, SmolVLM2 as transformers' SmolVLM, LLaVA-OneVision as
``LlavaOnevisionForConditionalGeneration``; its processor (``models.tiny.preset_processor``) has
the published processor settings (images split into tiles) at the preset's tile size.

Where the numbers come from: each preset's comment names the checkpoint repo and file. The hub
itself cannot be reached from here, so the values were read from copies of those files quoted
in public code and from the model cards, and cross-checked by rebuilding each model: every
total lands within 0.2% of the exact figure its model page shows (see tests/unit/test_presets.py).
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hpc_train.errors import ConfigError
from hpc_train.models.families import FAMILIES

GROUPS = ("vision", "connector", "llm", "head")
"""The module groups ``count_parameters`` reports, besides ``total``."""


@dataclass(frozen=True)
class Preset:
    """One published architecture: where it comes from, its size, and how it spends tokens."""

    name: str
    family: str
    """A key of ``hpc_train.models.families.FAMILIES``."""
    hf_id: str
    """Where the published weights live (documentation only; never fetched)."""
    published_params: int
    """Total parameter count the model card / model page publishes."""
    image_size: int
    """Side of the square the vision tower takes (one tile)."""
    tokens_per_image: int
    """LM tokens one image tile costs: SmolVLM ``image_seq_len``; LLaVA-OV base tile features."""
    tokens_per_video_frame: int
    """LM tokens one video frame costs (SmolVLM: a frame is one unsplit tile; LLaVA-OV: after
    2x2 pooling, plus one newline token per whole video that is not counted here)."""
    config_values: Mapping[str, Any] = field(repr=False, compare=False)
    """Keyword arguments of the family's config class, as in the published ``config.json``."""

    def build_config(self) -> PretrainedConfig:
        """A fresh config of this architecture (callers may edit it freely)."""
        return FAMILIES[self.family].config_class(**copy.deepcopy(dict(self.config_values)))


def _smolvlm(*, vision: dict[str, Any], text: dict[str, Any], scale_factor: int,
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
_SIGLIP_B16_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "image_size": 512, "patch_size": 16}

# SmolVLM 2.2B: SigLIP so400m-patch14-384 with all 27 layers (Idefics3 has no pooling head).
_SIGLIP_SO400M_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                      "num_attention_heads": 16, "image_size": 384, "patch_size": 14}

# LLaVA-OneVision: the same SigLIP so400m with its last layer and pooling head dropped
# (transformers src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py:
# ``num_hidden_layers=26  # drop the last layer``, ``vision_use_head=False``).
_LLAVA_OV_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 1152,
                    "intermediate_size": 4304, "num_hidden_layers": 26, "num_attention_heads": 16,
                    "image_size": 384, "patch_size": 14, "vision_use_head": False}

# anyres_max_9 grid: every (h, w) with h, w in {384, 768, ..., 2304}, row-major, as listed in
# the llava-hf configs (and transformers' LlavaOnevisionConfig default).
_ANYRES_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def _llava_onevision(*, text: dict[str, Any], tie: bool) -> Mapping[str, Any]:
    """LlavaOnevisionConfig keyword arguments; the text model is Qwen2-{0.5B,7B}-Instruct.

    The llava-hf conversion adds ``<image>`` (151646) and ``<video>`` (151647) to the Qwen2
    tokenizer and pads the embedding to vocab + 2 rounded up to a multiple of 64, which gives
    the published vocab sizes (151936 -> 152000, 152064 -> 152128).
    """
    return MappingProxyType({
        "vision_config": dict(_LLAVA_OV_SIGLIP),
        "text_config": {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6,
                        "rope_theta": 1_000_000.0, "max_position_embeddings": 32768,
                        "tie_word_embeddings": tie, **text},
        "image_token_index": 151646,
        "video_token_index": 151647,
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": _ANYRES_PINPOINTS,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": tie,
    })


def _smolvlm_tokens(vision: Mapping[str, int], scale_factor: int) -> int:
    """Tokens per tile after the pixel shuffle: (side / patch)^2 / scale^2."""
    return (vision["image_size"] // vision["patch_size"]) ** 2 // scale_factor**2


_LLAVA_OV_TILE = (_LLAVA_OV_SIGLIP["image_size"] // _LLAVA_OV_SIGLIP["patch_size"]) ** 2  # 729
# Video frames are bilinearly pooled 2x2: ceil(27 / 2)^2 = 196 tokens a frame.
_LLAVA_OV_FRAME = math.ceil(math.isqrt(_LLAVA_OV_TILE) / 2) ** 2

_PRESET_LIST = [
    # HuggingFaceTB/SmolVLM-256M-Instruct, config.json: vision 768/3072/12 layers/12 heads
    # @ 512 px patch 16; text SmolLM2-135M: Llama 576/1536/30 layers, 9 heads, 3 kv heads,
    # vocab 49280, rope_theta 100000, 8192 positions; scale_factor 4 (the card's "64 visual
    # tokens per 512x512 patch"), image_token_id 49190 "<image>", tie_word_embeddings false.
    # Params: the model card and page say 256M.
    Preset(
        name="smolvlm-256m", family="smolvlm", hf_id="HuggingFaceTB/SmolVLM-256M-Instruct",
        published_params=256_000_000, image_size=512,
        tokens_per_image=_smolvlm_tokens(_SIGLIP_B16_512, 4),
        tokens_per_video_frame=_smolvlm_tokens(_SIGLIP_B16_512, 4),
        config_values=_smolvlm(
            vision=dict(_SIGLIP_B16_512),
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
        tokens_per_image=_smolvlm_tokens(_SIGLIP_B16_512, 4),
        tokens_per_video_frame=_smolvlm_tokens(_SIGLIP_B16_512, 4),
        config_values=_smolvlm(
            vision=dict(_SIGLIP_B16_512),
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
        tokens_per_image=_smolvlm_tokens(_SIGLIP_SO400M_384, 3),
        tokens_per_video_frame=_smolvlm_tokens(_SIGLIP_SO400M_384, 3),
        config_values=_smolvlm(
            vision=dict(_SIGLIP_SO400M_384),
            text={"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49155,
                  "max_position_embeddings": 16384, "rope_theta": 273_768.0},
            scale_factor=3, image_token_id=49153,
        ),
    ),
    # SmolVLM2 (transformers' SmolVLM classes, model_type "smolvlm"): the same modules and parameter
    # names as Idefics3, so the layer sizes below are config.json's as for SmolVLM; what differs is
    # the processor (videos with timestamps, frames unsplit). Sources: each repo's config.json as
    # quoted on its hub commit pages (SmolVLM2-500M-Video-Instruct PR #4 adds num_hidden_layers 32;
    # SmolVLM2-2.2B-Instruct refs/pr/21: scale_factor 3, image_token_id 49190, text 2048/8192/24
    # layers, 8192 positions); the two small ones keep SmolVLM-256M/500M's SmolLM2 text sizes
    # (576/1536/30/9/3 and 960/2560/32/15/5, vocab 49280, rope_theta 100000) and the SigLIP
    # base-patch16-512 tower; scale_factor 4 (64 tokens a 512-px tile, processor_config image_seq_len
    # 64). The 2.2B's rope_theta (130000) comes from a copy of its config in public test specs.
    # Params: the names say 256M / 500M / 2.2B (no exact figure found); the totals match SmolVLM's
    # same-sized presets (the 2.2B: 2.25B).
    Preset(
        name="smolvlm2-256m", family="smolvlm2", hf_id="HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
        published_params=256_000_000, image_size=512,
        tokens_per_image=_smolvlm_tokens(_SIGLIP_B16_512, 4),
        tokens_per_video_frame=_smolvlm_tokens(_SIGLIP_B16_512, 4),
        config_values=_smolvlm(
            vision=dict(_SIGLIP_B16_512),
            text={"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                  "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49280,
                  "max_position_embeddings": 8192, "rope_theta": 100_000.0},
            scale_factor=4, image_token_id=49190,
        ),
    ),
    Preset(
        name="smolvlm2-500m", family="smolvlm2", hf_id="HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
        published_params=500_000_000, image_size=512,
        tokens_per_image=_smolvlm_tokens(_SIGLIP_B16_512, 4),
        tokens_per_video_frame=_smolvlm_tokens(_SIGLIP_B16_512, 4),
        config_values=_smolvlm(
            vision=dict(_SIGLIP_B16_512),
            text={"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                  "num_attention_heads": 15, "num_key_value_heads": 5, "vocab_size": 49280,
                  "max_position_embeddings": 8192, "rope_theta": 100_000.0},
            scale_factor=4, image_token_id=49190,
        ),
    ),
    Preset(
        name="smolvlm2-2.2b", family="smolvlm2", hf_id="HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        published_params=2_250_000_000, image_size=384,
        tokens_per_image=_smolvlm_tokens(_SIGLIP_SO400M_384, 3),
        tokens_per_video_frame=_smolvlm_tokens(_SIGLIP_SO400M_384, 3),
        config_values=_smolvlm(
            vision=dict(_SIGLIP_SO400M_384),
            text={"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49280,
                  "max_position_embeddings": 8192, "rope_theta": 130_000.0},
            scale_factor=3, image_token_id=49190,
        ),
    ),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf, config.json, as written by transformers'
    # convert_llava_onevision_weights_to_hf.py from lmms-lab/llava-onevision-qwen2-0.5b-ov:
    # vision above; text Qwen/Qwen2-0.5B-Instruct config.json: 896/4864/24 layers, 14 heads,
    # 2 kv heads, rope_theta 1e6, 32768 positions, tied embeddings; vocab 152000 after the
    # conversion. Params: the model page shows 894M (tied embeddings counted once).
    Preset(
        name="llava-onevision-0.5b", family="llava_onevision",
        hf_id="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        published_params=894_000_000, image_size=384,
        tokens_per_image=_LLAVA_OV_TILE, tokens_per_video_frame=_LLAVA_OV_FRAME,
        config_values=_llava_onevision(
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
        tokens_per_image=_LLAVA_OV_TILE, tokens_per_video_frame=_LLAVA_OV_FRAME,
        config_values=_llava_onevision(
            text={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                  "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152128},
            tie=False,
        ),
    ),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}

def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises ConfigError with the closest match."""
    try:
        return PRESETS[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"unknown model preset '{name}'{hint}. Fix: use one of {', '.join(PRESETS)}"
    )


def build_model(name: str, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The preset's model with random weights, built directly on ``device`` in ``dtype``.

    ``device="meta"`` allocates nothing: use it to count parameters or plan memory. Building
    in place (rather than on CPU and then ``.to()``) keeps a 7B model from ever needing a
    full fp32 copy in host memory.
    """
    preset = get_preset(name)
    config = preset.build_config()
    model_class = FAMILIES[preset.family].model_class
    with torch.device(device):
        # _from_config sets the default dtype while the modules are created.
        model = model_class._from_config(config, dtype=dtype)
    return model


def count_parameters(name: str) -> dict[str, int]:
    """Parameters of the preset by module group, counted on the meta device.

    Returns ``total`` plus ``vision``, ``connector``, ``llm`` and ``head`` (prefixes from the
    family's ``module_groups``). Each shared tensor counts once, as in the published totals:
    a head tied to the input embedding has no parameters of its own, so ``head`` is 0 there
    and the shared matrix is counted under ``llm``.
    """
    from hpc_train.models.adapters import param_census

    census = param_census(build_model(name, device="meta"), FAMILIES[get_preset(name).family])
    counts = {group: census[group].total for group in GROUPS}
    return {"total": sum(counts.values()), **counts}
