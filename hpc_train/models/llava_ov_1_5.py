"""LLaVA-OneVision-1.5 as the hub checkpoint lays it out: ``visual`` (our RICE-ViT tower and
merger), ``model`` (transformers' own ``Qwen3Model``) and an untied ``lm_head``.

transformers 5.24 has no class for it and the checkpoint's remote code does not import there
(we never run a model folder's code anyway), so the model is assembled here from the
ecosystem's parts, with the checkpoint's own parameter names: a published folder loads with no
key renamed, and :func:`hpc_train.models.load.check_loaded_keys` fails on any key missing or
left over. Its ``config.json`` is read as data (``model_type`` ``llavaonevision1_5``; its
``auto_map`` is never consulted) and written back in the same layout, so a merged export loads
in the upstream code too.

The forward is the reference's: each image (``<|image_pad|>``) and video (``<|video_pad|>``)
placeholder takes the next row of its kind's features, in order; the language positions are
plain 1-D (a packed row's restart per sample, as for Qwen3), never Qwen2-VL's 3-D ones. (The
tower differs from the reference in one place, on purpose: :mod:`hpc_train.models.rice_vit`.)
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3Model,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.import_utils import torch_compilable_check

from hpc_train.models.rice_vit import RiceVisionTower, RiceVitConfig

TEXT_MODEL_TYPE = "LLaVAOneVision1_5_text"
"""What the hub's ``config.json`` calls its text sub-config (a Qwen3 layout), kept on save."""


@strict
class LlavaOnevision15Config(PreTrainedConfig):
    """A LLaVA-OneVision-1.5 ``config.json``: ``vision_config`` (``rice_vit``), ``text_config``
    (Qwen3's fields, read into transformers' :class:`~transformers.Qwen3Config`) and the media
    token ids of the published tokenizer."""

    model_type = "llavaonevision1_5"
    sub_configs_defaults = {"vision_config": SubConfigSpec(RiceVitConfig), "text_config": SubConfigSpec(Qwen3Config)}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.text_config, dict):  # the hub names the Qwen3 layout its own way
            self.text_config = {k: v for k, v in self.text_config.items() if k != "model_type"}
        super().__post_init__(**kwargs)
        self.vision_config.text_hidden_size = self.text_config.hidden_size  # the merger's output width

    def to_dict(self) -> dict[str, Any]:
        """As the hub's ``config.json``: its names for the text config and the architecture, and
        ``rope_theta`` and the top-level ``vocab_size`` where transformers 4 (the upstream code)
        reads them (its loss reads the latter). An ``auto_map`` read from a published folder is
        kept as data (only the upstream code would use it)."""
        out = super().to_dict()
        text = out["text_config"]
        text["model_type"] = TEXT_MODEL_TYPE
        text["rope_theta"] = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta"))
        out["vocab_size"] = text["vocab_size"]
        out["architectures"] = ["LLaVAOneVision1_5_ForConditionalGeneration"]
        return out


class LlavaOnevision15ForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """The hub checkpoint's model: ``visual`` + ``model`` (Qwen3) + ``lm_head``."""

    config_class = LlavaOnevision15Config
    config: LlavaOnevision15Config
    base_model_prefix = ""
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer", "Block"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: LlavaOnevision15Config) -> None:
        super().__init__(config)
        self.visual = RiceVisionTower(config.vision_config)
        self.model = Qwen3Model(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RiceVisionTower):  # as the reference draws them; loaded values are kept
            init.normal_(module.class_embedding, std=module.config.hidden_size**-0.5)
            init.normal_(module.class_pos_emb, std=1.0)
            init.copy_(module.inv_freq, module.rotary_frequencies())

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                           **_: Any) -> BaseModelOutputWithPooling:
        """The merged rows of every image, in order: ``pooler_output`` a list with one tensor."""
        return BaseModelOutputWithPooling(pooler_output=[self.visual(pixel_values, image_grid_thw)])

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor,
                           **_: Any) -> BaseModelOutputWithPooling:
        """The merged rows of every video's frames, in order (the same tower: a frame is an image)."""
        return BaseModelOutputWithPooling(pooler_output=[self.visual(pixel_values_videos, video_grid_thw)])

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None,
                mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        features = dict(mm_encoder_outputs or {})
        if features.get("image") is None and pixel_values is not None:
            features["image"] = self.get_image_features(pixel_values, image_grid_thw)
        if features.get("video") is None and pixel_values_videos is not None:
            features["video"] = self.get_video_features(pixel_values_videos, video_grid_thw)
        for kind, found in features.items():
            if found is not None:
                inputs_embeds = self.placed(input_ids, inputs_embeds, kind, found.pooler_output)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=use_cache, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def placed(self, input_ids: torch.Tensor | None, embeds: torch.Tensor, kind: str,
               rows: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``embeds`` with ``kind``'s feature rows at its placeholder tokens, in order."""
        rows = torch.cat(list(rows)) if isinstance(rows, (list, tuple)) else rows
        rows = rows.reshape(-1, embeds.shape[-1]).to(embeds.device, embeds.dtype)
        token = getattr(self.config, f"{kind}_token_id")
        if input_ids is None:
            marker = self.model.embed_tokens(torch.tensor(token, device=embeds.device))
            where = (embeds == marker).all(-1)
        else:
            where = input_ids == token
        count = where.sum()
        torch_compilable_check(count == rows.shape[0], lambda: f"{kind} features and {kind} tokens do not match: "
                                                               f"{int(count)} tokens, {rows.shape[0]} feature rows")
        return embeds.masked_scatter(where.unsqueeze(-1), rows)


# transformers' Auto classes then load a published folder with our classes: its model_type is
# known here, so its auto_map (remote code) is never consulted.
AutoConfig.register(RiceVitConfig.model_type, RiceVitConfig, exist_ok=True)
AutoConfig.register(LlavaOnevision15Config.model_type, LlavaOnevision15Config, exist_ok=True)
AutoModelForImageTextToText.register(LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration, exist_ok=True)

__all__ = ["LlavaOnevision15Config", "LlavaOnevision15ForConditionalGeneration", "TEXT_MODEL_TYPE"]
