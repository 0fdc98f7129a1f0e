"""FLOPs per step from a model's architecture, and model FLOPs utilisation (MFU).

Counts are *model* FLOPs (a multiply-add is 2 FLOPs): what the step needs, not what the
hardware ran. Gradient-checkpointing recomputation, QLoRA's 4-bit dequantisation and
elementwise work (norms, activations, softmax) are not counted, so MFU is comparable
between runs that differ only in how they spend extra work.

Backward is counted per component (vision tower, connector, language model, head):

- weights trained: activation gradients (1x forward, 2x for attention scores and values,
  which have no weights but two operands that need gradients) + weight gradients (1x the
  matmul part of forward): the usual "backward = 2x forward";
- frozen but something before it trains (e.g. the language model under LoRA): activation
  gradients only;
- frozen with nothing trainable before it (a frozen vision tower): nothing;
- LoRA adapters: 2 FLOPs per adapter parameter per token forward, 4 backward.

Peak rates are dense (no sparsity) tensor-core figures from the vendors' datasheets, for
GPUs we can name exactly; anything else is "unknown" and MFU is left out, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

COMPONENTS = ("vision", "connector", "llm", "head")
"""In data-flow order: a gradient reaching one component has passed the later ones."""

GATED_MLP_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "smollm3"})
"""Text models whose MLP is gate/up/down (three matrices) rather than fc1/fc2."""
VISION_TYPES = frozenset({"idefics3_vision", "siglip_vision_model", "smolvlm_vision", "rice_vit"})
GRID_TOWERS = frozenset({"rice_vit"})
"""Towers that take each image at its own size (patch rows with a t·h·w grid), one attention
segment per image or frame; their FLOPs follow the rows and segments counted
(:func:`grid_work`), and ``vision_tokens_per_image`` is only the planning unit."""
PLAN_SIDE = 448
"""The square a grid tower's per-image figures describe, where no rows were counted."""


class UnknownArchitecture(ValueError):
    """The FLOPs of this architecture cannot be counted from its config."""


@dataclass(frozen=True)
class TransformerShape:
    """The dimensions of a stack of transformer layers that determine its FLOPs."""

    layers: int
    hidden: int
    q_dim: int
    """Query width: attention heads x head dim."""
    kv_dim: int
    """Key / value width: key-value heads x head dim."""
    intermediate: int
    gated_mlp: bool
    causal: bool

    def matmul_params(self) -> int:
        """Weights of the linear layers of the whole stack (biases and norms left out)."""
        attention = self.hidden * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.hidden
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return self.layers * (attention + mlp)

    def attention_flops_per_token(self, context: float) -> float:
        """Scores and weighted values for one token among ``context`` (a causal token sees half)."""
        seen = context / 2 if self.causal else context
        return 2 * 2 * self.layers * self.q_dim * seen


@dataclass(frozen=True)
class ModelShape:
    """What FLOPs counting needs of a vision-language model."""

    text: TransformerShape
    vocab: int
    vision: TransformerShape | None = None
    vision_tokens_per_image: int = 0
    """Patches the vision tower sees per image (or per frame / tile)."""
    patch_embed_params: int = 0
    vision_head_flops_per_image: float = 0.0
    """SigLIP's attention-pooling head, when the config keeps it (it runs though unused)."""
    connector_flops_per_image: float = 0.0
    connector_tokens_per_image: int = 0
    """Rows the connector's linear layers see per image (Idefics3: after pixel shuffle)."""
    grid_tower: bool = False
    """Images at their own size (:data:`GRID_TOWERS`): the per-image figures are the planning square's."""


def _dims(cfg: Any) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return cfg.hidden_size, heads * head_dim, kv_heads * head_dim


def shape_of(config: Any) -> ModelShape:
    """The :class:`ModelShape` of a transformers config (Idefics3 / SmolVLM, LLaVA-OneVision)."""
    text_cfg = getattr(config, "text_config", config)
    text_type = getattr(text_cfg, "model_type", None)
    if text_type not in GATED_MLP_TYPES:
        raise UnknownArchitecture(f"language model type {text_type!r} is not one we can count")
    hidden, q_dim, kv_dim = _dims(text_cfg)
    text = TransformerShape(text_cfg.num_hidden_layers, hidden, q_dim, kv_dim, text_cfg.intermediate_size,
                            gated_mlp=True, causal=True)
    vision_cfg = getattr(config, "vision_config", None)
    if vision_cfg is None:
        return ModelShape(text=text, vocab=text_cfg.vocab_size)
    if getattr(vision_cfg, "model_type", None) not in VISION_TYPES:
        raise UnknownArchitecture(f"vision tower type {vision_cfg.model_type!r} is not one we can count")
    if vision_cfg.model_type in GRID_TOWERS:
        return _grid_shape(text, text_cfg.vocab_size, vision_cfg)
    v_hidden, v_q, v_kv = _dims(vision_cfg)
    vision = TransformerShape(vision_cfg.num_hidden_layers, v_hidden, v_q, v_kv, vision_cfg.intermediate_size,
                              gated_mlp=False, causal=False)
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    scale = getattr(config, "scale_factor", None)
    if scale:  # Idefics3: pixel shuffle, then one linear to the text width per output token
        rows = patches // (scale * scale)
        connector = 2.0 * (v_hidden * scale * scale * hidden) * rows
    else:  # LLaVA: a two-layer MLP on every patch
        rows = patches
        connector = 2.0 * (v_hidden * hidden + hidden * hidden) * patches
    head = 0.0
    if getattr(vision_cfg, "vision_use_head", False):  # one probe token attends to every patch
        head = 2.0 * (2 * v_hidden * v_hidden * patches + 2 * v_hidden * v_hidden
                      + 2 * v_hidden * vision_cfg.intermediate_size) + 4.0 * v_hidden * patches
    return ModelShape(text=text, vocab=text_cfg.vocab_size, vision=vision, vision_tokens_per_image=patches,
                      patch_embed_params=vision_cfg.num_channels * vision_cfg.patch_size ** 2 * v_hidden,
                      vision_head_flops_per_image=head, connector_flops_per_image=connector,
                      connector_tokens_per_image=rows)


def _grid_shape(text: TransformerShape, vocab: int, vision_cfg: Any) -> ModelShape:
    """RICE-ViT: pre-norm blocks on every 14-px patch, then each 2×2 window merged by a
    two-layer MLP (4·width → 4·width → the text width)."""
    width = vision_cfg.hidden_size
    vision = TransformerShape(vision_cfg.depth, width, width, width, vision_cfg.intermediate_size,
                              gated_mlp=False, causal=False)
    window = vision_cfg.spatial_merge_size ** 2
    patches = (PLAN_SIDE // vision_cfg.patch_size) ** 2
    merged = patches // window
    connector = 2.0 * (window * width * window * width + window * width * text.hidden) * merged
    return ModelShape(text=text, vocab=vocab, vision=vision, vision_tokens_per_image=patches,
                      patch_embed_params=vision_cfg.in_channels * vision_cfg.patch_size ** 2 * width,
                      connector_flops_per_image=connector, connector_tokens_per_image=merged, grid_tower=True)


@dataclass(frozen=True)
class VisionWork:
    """What a vision tower encoded: images (frames, tiles), and for a grid tower the patch rows
    and the sum over its attention segments of rows² (0: ``images`` × the shape's per-image figures)."""

    images: int = 0
    rows: int = 0
    pairs: int = 0

    def __add__(self, other: VisionWork) -> VisionWork:
        return VisionWork(self.images + other.images, self.rows + other.rows, self.pairs + other.pairs)


def grid_work(grid_thw: Any) -> VisionWork:
    """A grid tower's work on items of ``grid_thw`` (rows of frames, patch rows, patch columns):
    each frame one segment of h·w patches."""
    grid = grid_thw.tolist() if hasattr(grid_thw, "tolist") else list(grid_thw)
    return VisionWork(images=sum(int(t) for t, _, _ in grid), rows=sum(int(t * h * w) for t, h, w in grid),
                      pairs=sum(int(t * (h * w) ** 2) for t, h, w in grid))


@dataclass(frozen=True)
class Trainability:
    """Which components train their own weights, and LoRA parameters per component."""

    trains: frozenset[str] = frozenset()
    lora_params: Mapping[str, int] = field(default_factory=dict)

    @property
    def training(self) -> bool:
        return bool(self.trains) or any(self.lora_params.values())


@dataclass(frozen=True)
class StepFlops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def step_flops(shape: ModelShape, trainability: Trainability, *, tokens: int, samples: int,
               images: int, context: float | None = None, vision_rows: int = 0, vision_pairs: int = 0) -> StepFlops:
    """Model FLOPs of a step that ran ``tokens`` real language-model tokens in ``samples``
    sequences and ``images`` images (frames, tiles) through the vision tower; a grid tower's
    ``vision_rows`` and ``vision_pairs`` as :class:`VisionWork` (0: from ``images``).

    Attention uses the mean sequence length ``context``, by default ``tokens / samples``: exact
    for equal lengths, a slight undercount when lengths vary. A rank holding a slice of each
    sequence (sequence parallelism) gives the whole sequences' mean: each of its tokens still
    attends over the whole sequence.
    """
    if context is None:
        context = tokens / samples if samples else 0.0
    # forward FLOPs of each component, and the part of it that is weight matmuls
    per_image = shape.vision_tokens_per_image
    rows = vision_rows or images * per_image
    pairs = vision_pairs or images * per_image ** 2
    images_worth = rows / per_image if per_image else 0.0  # the connector's work follows the patch rows
    weights: dict[str, float] = {
        "llm": 2.0 * shape.text.matmul_params() * tokens,
        "head": 2.0 * shape.text.hidden * shape.vocab * tokens,
        "vision": 0.0, "connector": shape.connector_flops_per_image * images_worth,
    }
    forward = dict(weights)
    forward["llm"] += shape.text.attention_flops_per_token(context) * tokens
    if shape.vision is not None:
        weights["vision"] = (2.0 * (shape.vision.matmul_params() + shape.patch_embed_params) * rows
                             + shape.vision_head_flops_per_image * images)
        forward["vision"] = weights["vision"] + shape.vision.attention_flops_per_token(1.0) * pairs
    work_items = {"vision": rows, "connector": shape.connector_tokens_per_image * images_worth,
                  "llm": tokens, "head": tokens}
    lora_forward = {c: 2.0 * trainability.lora_params.get(c, 0) * work_items[c] for c in COMPONENTS}
    backward = 0.0
    for index, component in enumerate(COMPONENTS):
        # Gradients must pass through this component when it, or anything fed into it, trains.
        upstream = COMPONENTS[:index + 1]
        if any(c in trainability.trains or trainability.lora_params.get(c, 0) for c in upstream):
            # activation gradients: 1x the forward, and once more for attention, whose two
            # operands (scores and values) both need gradients
            backward += forward[component] + (forward[component] - weights[component])
        if component in trainability.trains:
            backward += weights[component]
        backward += 2.0 * lora_forward[component]
    return StepFlops(forward=sum(forward.values()) + sum(lora_forward.values()), backward=backward)


# Dense bf16/fp16 and fp32 tensor-core peaks in TFLOP/s, per GPU, from vendor datasheets.
# A name matches when every word of the key appears in torch's device name and no word of
# ``excludes`` does (an H100 NVL or H200 NVL has other clocks: unknown rather than wrong).
@dataclass(frozen=True)
class PeakRate:
    key: tuple[str, ...]
    bf16: float
    fp32: float
    excludes: tuple[str, ...] = ()
    source: str = ""


PEAK_RATES = (
    PeakRate(("H100", "HBM3"), 989.4, 66.9, ("NVL", "PCIE"), "NVIDIA H100 SXM5 datasheet"),
    PeakRate(("H100", "SXM"), 989.4, 66.9, ("NVL", "PCIE"), "NVIDIA H100 SXM5 datasheet"),
    PeakRate(("H100", "PCIE"), 756.0, 51.2, ("NVL",), "NVIDIA H100 PCIe datasheet"),
    PeakRate(("H200",), 989.4, 66.9, ("NVL",), "NVIDIA H200 SXM datasheet"),
    PeakRate(("GH200",), 989.4, 66.9, (), "NVIDIA GH200 datasheet"),
    PeakRate(("A100",), 312.0, 19.5, (), "NVIDIA A100 datasheet"),
    PeakRate(("L40S",), 362.05, 91.6, (), "NVIDIA L40S datasheet"),
    PeakRate(("L4",), 121.0, 30.3, (), "NVIDIA L4 datasheet"),
)


@dataclass(frozen=True)
class Peak:
    tflops: float | None
    """``None``: unknown."""
    source: str


MIG_SLICE = re.compile(r"\bMIG (\d+)g\.\d+gb\b", re.IGNORECASE)
"""A MIG instance's name as the driver gives it (``NVIDIA A100-SXM4-80GB MIG 3g.40gb``): the
number before ``g`` is its share of the GPU's compute slices."""
MIG_SLICES = {"A30": 4}
"""Compute slices of a whole GPU, where not 7 (A100, H100, H200)."""


def peak_tflops(device_name: str | None, dtype: str) -> Peak:
    """The peak rate of one device for ``dtype`` (``bf16``, ``fp16`` or ``fp32``), or unknown; a
    MIG instance gets its share of the whole GPU's."""
    if not device_name or device_name.lower() == "cpu":
        return Peak(None, "unknown: no peak rate for CPUs")
    words = set(device_name.upper().replace("-", " ").replace("_", " ").split())
    for rate in PEAK_RATES:
        if all(k in words for k in rate.key) and not any(x in words for x in rate.excludes):
            value = rate.fp32 if dtype == "fp32" else rate.bf16
            source = f"{rate.source} ({'fp32' if dtype == 'fp32' else 'bf16/fp16'} dense)"
            mig = MIG_SLICE.search(device_name)
            if mig is None:
                return Peak(value, source)
            total = next((n for key, n in MIG_SLICES.items() if key in words), 7)
            share = int(mig.group(1))
            return Peak(round(value * share / total, 2), f"{source} x {share}/{total} (a MIG slice)")
    return Peak(None, f"unknown: no datasheet peak for {device_name!r}")


def mfu(flops: float, seconds: float, devices: int, peak: Peak) -> float | None:
    """Achieved FLOP/s over ``devices`` x peak, or ``None`` when the peak is unknown."""
    if peak.tflops is None or seconds <= 0 or devices <= 0:
        return None
    return flops / seconds / (devices * peak.tflops * 1e12)


NOTES = ("model FLOPs: recomputation (gradient checkpointing), 4-bit dequantisation and elementwise "
         "work are not counted", "attention uses each step's mean sequence length")
