"""One description per model family: what the data pipeline and the trainer need to know.

SmolVLM / SmolVLM2 are transformers' Idefics3; LLaVA-OneVision is its own class. The two
differ in how media reach the model: SmolVLM sees a video as a run of images, LLaVA-OneVision
has a video path with pooled frames. Audio (``<speech>``) reaches both as a spectrogram
picture, since neither has an audio encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpc_train.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """What differs between model families."""

    name: str
    model_type: str
    """``config.model_type`` of the HF model."""
    end_of_turn: str
    """Token that closes every chat turn; it is supervised at the end of each assistant turn."""
    image_token: str
    video_token: str | None
    """``None`` when videos are fed as a run of images."""
    module_groups: dict[str, tuple[str, ...]]
    """Parameter-name prefixes of each module group (vision / connector / llm / head)."""
    inner_model: str
    """Class name of the model holding the vision tower and the language model."""
    language_model: str
    """That model's attribute holding the language model."""
    media_kinds: tuple[str, ...]
    """Kinds of media features merged into the sequence, each at its ``<kind>_token_id``."""

    @property
    def video_as_images(self) -> bool:
        return self.video_token is None


SMOLVLM = Family(
    name="smolvlm",
    model_type="idefics3",
    end_of_turn="<end_of_utterance>",
    image_token="<image>",
    video_token=None,
    module_groups={
        "vision": ("model.vision_model.",),
        "connector": ("model.connector.",),
        "llm": ("model.text_model.",),
        "head": ("lm_head.",),
    },
    inner_model="Idefics3Model",
    language_model="text_model",
    media_kinds=("image",),
)

LLAVA_ONEVISION = Family(
    name="llava_onevision",
    model_type="llava_onevision",
    end_of_turn="<|im_end|>",
    image_token="<image>",
    video_token="<video>",
    module_groups={
        "vision": ("model.vision_tower.",),
        "connector": ("model.multi_modal_projector.", "model.image_newline"),
        "llm": ("model.language_model.",),
        "head": ("lm_head.",),
    },
    inner_model="LlavaOnevisionModel",
    language_model="language_model",
    media_kinds=("image", "video"),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SMOLVLM, LLAVA_ONEVISION)}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}
# SmolVLM2 checkpoints name themselves "smolvlm"; their processor and model follow Idefics3.
_BY_MODEL_TYPE["smolvlm"] = SMOLVLM


def get_family(name: str) -> Family:
    """The family called ``name`` (``smolvlm`` or ``llava_onevision``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown model family '{name}'. Fix: use one of {', '.join(sorted(FAMILIES))}"
        ) from None


def family_of_model_type(model_type: str) -> Family:
    """The family of a saved model, from its ``config.json`` ``model_type``."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ConfigError(
            f"model_type '{model_type}' is not a supported family. Fix: use a SmolVLM (idefics3) "
            "or LLaVA-OneVision (llava_onevision) model folder"
        ) from None
