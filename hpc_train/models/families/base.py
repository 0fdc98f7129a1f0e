"""What a model family is: one typed description that every part of the toolkit reads.

A family module (``smolvlm``, ``smolvlm2``, ``llava_onevision``) builds one :class:`Family`:
how its checkpoints are recognised, its chat-template tokens, how each media kind reaches the
model, where its vision tower and language model sit (found by role, never by class name),
its module groups, its batch layout, how a sequence-parallel group shares its vision work, how
cached features replace its tower, and how a tiny model and a preset's processor are built.
Nothing outside the family modules branches on a family's name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin


class MediaLayout:
    """How one family's media tensors are laid out: for one sample, a padded batch, a packed row.

    ``samples`` are :class:`~hpc_train.data.encoding.tokenize.EncodedSample` (read: ``.media``, ``.id``)."""

    shared_by: str = ""
    """The host bookkeeping by which sequence parallelism shares the vision work of a sample
    (a key of :mod:`hpc_train.models.media_keys`: ``tile_frames``, ``image_rows`` or ``grid_thw``)."""

    def sample(self, processor_out: Any) -> dict[str, torch.Tensor]:
        """One sample's media tensors, without a batch dimension, from the processor's output."""
        raise NotImplementedError

    def batch(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The media of a padded batch of ``samples``."""
        raise NotImplementedError

    def packed_row(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The media of one packed row holding ``samples``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Preset:
    """One published architecture of a family: where it comes from, its size, and how it spends tokens.
    Each family module lists its own (``Family.presets``); :mod:`hpc_train.models.presets` builds them."""

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
        from hpc_train.models.families import FAMILIES

        return FAMILIES[self.family].config_class(**copy.deepcopy(dict(self.config_values)))


FeatureEncoder = Callable[[Any, dict[str, Any], dict[str, Any]], torch.Tensor]
"""``(inner model, the kind's pixel inputs, the forward's other inputs) -> feature rows``."""


@dataclass(frozen=True)
class Family:
    """Everything that differs between model families."""

    name: str
    title: str
    """How the README and messages name it (``SmolVLM2 (transformers' SmolVLM)``)."""
    model_types: tuple[str, ...]
    """``config.json`` ``model_type`` values of its checkpoints."""
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    end_of_turn: str
    """Token that closes every chat turn; it is supervised at the end of each assistant turn."""
    image_token: str
    video_token: str | None
    """What the chat template writes for a video item; ``None``: the template has no video item,
    so each frame goes in as an image item."""
    video_kind: str
    """The kind of media features a video's frames become in the model (``image`` or ``video``)."""
    media_kinds: tuple[str, ...]
    """Kinds of media features merged into the sequence, each at its ``<kind>_token_id``."""
    pixel_inputs: Mapping[str, tuple[str, ...]]
    """Per kind of media features, the forward's inputs carrying its pixels (the first always present)."""
    module_groups: Mapping[str, tuple[str, ...]]
    """Parameter-name prefixes of each module group (vision / connector / llm / head)."""
    vision_model: str
    language_model: str
    """Attributes of the inner model (the one holding both) that hold the tower and the language model."""
    layout: MediaLayout = field(repr=False)
    feature_encoders: Mapping[str, FeatureEncoder] = field(repr=False)
    """Per kind: the tower and connector's rows for a batch's pixels (the frozen-vision cache)."""
    share_vision: Callable[[torch.nn.Module, Any], None] = field(repr=False)
    """Make the inner model encode only this rank's pixels in a sequence-parallel ``group``."""
    build_tiny: Callable[..., tuple[PreTrainedModel, ProcessorMixin]] = field(repr=False)
    """A tiny random model and its processor, configured as the published folders are."""
    preset_processor: Callable[[PretrainedConfig, int], ProcessorMixin] = field(repr=False)
    """An offline processor for a preset's architecture (and its tokens per image tile)."""
    presets: tuple[Preset, ...] = field(default=(), repr=False)
    """Its published architectures (``model.preset``), built with random weights."""
    tile_tokens_fixed: bool = False
    """Every image tile costs the same tokens (Idefics3's check of them can be proven once)."""
    video_inputs: Callable[[Sequence[Any]], dict[str, Any]] | None = field(default=None, repr=False)
    """Extra processor keyword arguments for a sample's decoded videos (fps, timestamps)."""
    strict_weights: bool = False
    """A folder whose weights miss or add a parameter is refused (our own model classes, whose names
    are the hub's; transformers' classes keep their own warnings about renamed or unused keys)."""
    prepare_frames: Callable[[Any, Any], Any] | None = field(default=None, repr=False)
    """``(processor, frames)``: decoded frames (T, H, W, 3 uint8) as the video processor first
    resizes them, for a prepared-media store (``None``: stored as decoded; see ``families/frames.py``)."""
    blank_side: Callable[[Any], int] | None = field(default=None, repr=False)
    """The side of the blank picture that costs the fewest tokens, from the processor (``None``:
    one tile, read from its image processor's ``size``)."""

    @property
    def video_as_images(self) -> bool:
        """Whether a video's frames are image features in the model (no stacked video tensor)."""
        return self.video_kind == "image"

    def inner_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model holding the vision tower and the language model (also inside DeepSpeed's and
        PEFT's wrappers): the module with both as children."""
        for module in model.modules():
            children = module._modules
            if self.vision_model in children and self.language_model in children:
                return module
        raise ValueError(f"{type(model).__name__} holds no module with both a '{self.vision_model}' and a "
                         f"'{self.language_model}' child: it is not a {self.title} model")

    def language_model_of(self, model: torch.nn.Module) -> torch.nn.Module:
        """The language model (its decoder layers are ``.layers``)."""
        return getattr(self.inner_model(model), self.language_model)


__all__ = ["FeatureEncoder", "Family", "MediaLayout", "Preset"]
