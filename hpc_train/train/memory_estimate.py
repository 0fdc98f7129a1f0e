"""Per-GPU memory of one training step, and which settings would make a run fit.

The estimate exists to *rank* remedies for an out-of-memory error (and to answer "will it
fit?" before a run), so it is simple and monotone in every knob rather than exact. All
figures are per GPU, in GiB (2**30 bytes). Assumptions:

* **Weights**: every parameter at ``param_bytes``. QLoRA keeps the LLM's linear weights in
  4-bit NF4: 0.5 byte/param plus ~3% for the quantisation constants; the embeddings
  (``vocab_size x hidden_size``), the ``lm_head``, the vision tower and the connector stay at
  ``param_bytes``. LoRA/QLoRA add ``lora_params`` adapter weights at ``param_bytes``.
  ZeRO-3 shards weights over ``world_size``. Gathered ZeRO-3 buckets and CUDA/NCCL workspace
  are ignored.
* **Gradients**: trainable params x ``param_bytes``; trainable is every unfrozen group in
  ``full`` mode, ``lora_params`` in ``lora``/``qlora``, nothing in ``baseline`` (evaluation
  only). ZeRO-2/3 shard them over ``world_size``.
* **Optimizer**: Adam with an fp32 master copy and two fp32 moments, 12 bytes per trainable
  param (8 when ``param_bytes == 4``: the weights already are the fp32 master). ZeRO-1 and up
  shard it over ``world_size``; ``offload_optimizer`` moves it to CPU memory (0 on the GPU).
* **Activations**: one transformer layer keeps ~34·h bytes per token in bf16 (Korthikanti
  et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", without
  recomputation; the attention-score term is dropped because flash attention never
  materialises it), scaled by ``param_bytes / 2`` for other dtypes, times layers and tokens.
  With gradient checkpointing each layer keeps only its input (counted as 2·h·param_bytes
  per token) plus one layer's full activations during its recomputation. The LM sees
  ``micro_batch x seq_len`` tokens; the vision tower ``micro_batch x frames_per_sample x
  vision_tokens_per_frame`` tokens with its own hidden size and depth. A tower that is not
  back-propagated (a frozen vision tower, or anything in ``baseline`` mode) holds just one
  layer's working set. In ``lora``/``qlora`` an unfrozen vision tower is assumed to carry
  adapters, so it keeps its activations. The connector's activations are ignored (small).
* **Logits**: ``micro_batch x seq_len x vocab_size`` in fp32 (upcast for the loss), twice
  (logits and their gradient); once in ``baseline`` mode, which has no backward.
* ``seq_len`` is the worst case (a sample filling ``max_seq_len``, padding included).

The advice built on it (re-estimating the run with one setting changed) is in
:mod:`hpc_train.train.oom_advice`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = float(2**30)

MODES = ("full", "lora", "qlora", "baseline")

# Korthikanti et al. 2022: 34·s·b·h bytes per layer in 16-bit without recomputation.
_ACT_BYTES_PER_HIDDEN_BF16 = 34
# Gradient checkpointing keeps each layer's input; 2·h·param_bytes per token allows for the
# residual copy some implementations keep beside it.
_CKPT_ELEMS_PER_HIDDEN = 2
# bitsandbytes NF4: 4 bits per weight plus double-quantised absmax constants (~3%).
_NF4_BYTES_PER_PARAM = 0.5 * 1.03
# Adam states per trainable param: fp32 master + 2 fp32 moments (master dropped in fp32 runs).
_ADAM_BYTES_MIXED = 12
_ADAM_BYTES_FP32 = 8
# When a full fine-tune is advised to switch to QLoRA but has no adapter size yet:
# rank 16 on the 7 linears (q, k, v, o, gate, up, down) of every LM layer, each ~h x h.
_DEFAULT_LORA_RANK = 16
_LORA_LINEARS_PER_LAYER = 7


@dataclass(frozen=True)
class RunShape:
    """What determines per-GPU memory of one training step."""

    params_vision: int
    params_connector: int
    params_llm: int  # language model incl. embeddings
    params_head: int  # lm_head (0 when tied)
    hidden_size: int  # LM hidden
    num_layers: int  # LM layers
    vocab_size: int
    vision_hidden_size: int
    vision_layers: int
    vision_tokens_per_frame: int  # patches the vision tower processes per image/frame
    lm_tokens_per_frame: int  # tokens one image/frame costs in the LM sequence
    mode: str  # "full" | "lora" | "qlora" | "baseline"
    lora_params: int  # trainable adapter params (lora/qlora)
    freeze_vision: bool
    freeze_connector: bool
    freeze_llm: bool
    zero_stage: int  # 0, 1, 2, 3
    offload_optimizer: bool
    world_size: int
    micro_batch: int
    seq_len: int  # max_seq_len (tokens per sample, media included)
    frames_per_sample: int  # images + video frames per sample (vision tower work)
    param_bytes: int  # 2 for bf16, 4 for fp32
    gradient_checkpointing: bool

    def __post_init__(self) -> None:
        # A wrong shape would give a confidently wrong estimate; refuse it instead.
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage {self.zero_stage}: expected 0, 1, 2 or 3")
        if self.world_size < 1 or self.micro_batch < 1 or self.seq_len < 1:
            raise ValueError("world_size, micro_batch and seq_len must be at least 1")
        if self.param_bytes < 1:
            raise ValueError(f"param_bytes {self.param_bytes}: expected 2 (bf16) or 4 (fp32)")
        counts = (self.params_vision, self.params_connector, self.params_llm, self.params_head,
                  self.lora_params, self.frames_per_sample, self.hidden_size, self.num_layers,
                  self.vocab_size, self.vision_hidden_size, self.vision_layers,
                  self.vision_tokens_per_frame, self.lm_tokens_per_frame)
        if min(counts) < 0:
            raise ValueError("parameter, token and layer counts must not be negative")


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated per-GPU memory of one training step, by kind, in GiB."""

    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float

    @property
    def total_gib(self) -> float:
        """Sum of all terms."""
        return (self.weights_gib + self.gradients_gib + self.optimizer_gib
                + self.activations_gib + self.logits_gib)


# ---------------------------------------------------------------------------------------
# Estimate


def trainable_params(shape: RunShape) -> int:
    """Parameters that receive gradients and optimizer states."""
    if shape.mode == "baseline":
        return 0
    if shape.mode in ("lora", "qlora"):
        return shape.lora_params
    total = 0
    if not shape.freeze_vision:
        total += shape.params_vision
    if not shape.freeze_connector:
        total += shape.params_connector
    if not shape.freeze_llm:
        total += shape.params_llm + shape.params_head
    return total


def default_lora_params(shape: RunShape) -> int:
    """Adapter size assumed when a run has none yet: rank 16 on the 7 linears of each LM layer."""
    return shape.num_layers * _LORA_LINEARS_PER_LAYER * _DEFAULT_LORA_RANK * 2 * shape.hidden_size


def _weight_bytes(shape: RunShape) -> float:
    pb = shape.param_bytes
    other = (shape.params_vision + shape.params_connector + shape.params_head) * pb
    if shape.mode == "qlora":
        # Only the LLM's linear layers are quantised; the input embeddings stay dense.
        embed = min(shape.vocab_size * shape.hidden_size, shape.params_llm)
        llm = (shape.params_llm - embed) * _NF4_BYTES_PER_PARAM + embed * pb
    else:
        llm = shape.params_llm * pb
    adapters = shape.lora_params * pb if shape.mode in ("lora", "qlora") else 0
    total = other + llm + adapters
    return total / shape.world_size if shape.zero_stage >= 3 else total


def _tower_activation_bytes(*, hidden: int, layers: int, tokens: int, param_bytes: int,
                            backward: bool, checkpointing: bool) -> float:
    if hidden == 0 or layers == 0 or tokens == 0:
        return 0.0
    per_layer = _ACT_BYTES_PER_HIDDEN_BF16 * hidden * tokens * param_bytes / 2
    if not backward:
        # Forward only: activations are freed layer by layer.
        return per_layer
    if checkpointing:
        return layers * _CKPT_ELEMS_PER_HIDDEN * hidden * param_bytes * tokens + per_layer
    return layers * per_layer


def _lm_backward(shape: RunShape) -> bool:
    # Every trainable group (adapters included) sits before or inside the LM, so any
    # training back-propagates through all of it.
    return trainable_params(shape) > 0


def _vision_backward(shape: RunShape) -> bool:
    return shape.mode != "baseline" and not shape.freeze_vision and shape.params_vision > 0


def estimate_memory(shape: RunShape) -> MemoryEstimate:
    """Estimate per-GPU memory of one training step (see the module docstring for the model)."""
    trainable = trainable_params(shape)
    world = shape.world_size

    gradients = trainable * shape.param_bytes
    if shape.zero_stage >= 2:
        gradients /= world

    adam = _ADAM_BYTES_FP32 if shape.param_bytes >= 4 else _ADAM_BYTES_MIXED
    optimizer = 0.0 if shape.offload_optimizer else float(trainable * adam)
    if shape.zero_stage >= 1:
        optimizer /= world

    lm_tokens = shape.micro_batch * shape.seq_len
    vision_tokens = shape.micro_batch * shape.frames_per_sample * shape.vision_tokens_per_frame
    activations = _tower_activation_bytes(
        hidden=shape.hidden_size, layers=shape.num_layers, tokens=lm_tokens,
        param_bytes=shape.param_bytes, backward=_lm_backward(shape),
        checkpointing=shape.gradient_checkpointing,
    ) + _tower_activation_bytes(
        hidden=shape.vision_hidden_size, layers=shape.vision_layers, tokens=vision_tokens,
        param_bytes=shape.param_bytes, backward=_vision_backward(shape),
        checkpointing=shape.gradient_checkpointing,
    )

    copies = 2 if _lm_backward(shape) else 1
    logits = lm_tokens * shape.vocab_size * 4 * copies

    return MemoryEstimate(
        weights_gib=_weight_bytes(shape) / GIB,
        gradients_gib=gradients / GIB,
        optimizer_gib=optimizer / GIB,
        activations_gib=activations / GIB,
        logits_gib=logits / GIB,
    )


def run_shape(model: Any, config: Any, world_size: int, ds: dict[str, Any] | None, family: Any) -> RunShape:
    """The :class:`RunShape` of a loaded run (a ``RunConfig``, its resolved DeepSpeed dict), for
    memory estimates and out-of-memory advice: parameters from the one census, architecture
    numbers from the one shape reader FLOPs counting uses too."""
    import torch

    from hpc_train.models.adapters import param_census
    from hpc_train.train.engine import offloads_optimizer, zero_stage
    from hpc_train.train.trainable_model import compute_dtype
    from profiling.flops import shape_of

    census = param_census(model, family)
    arch = shape_of(model.config)
    video = config.data.video
    frames = video.max_frames if video.sampling == "fps" else video.num_frames
    per_frame = arch.vision_tokens_per_image
    if arch.grid_tower:  # frames at their own size: as many patch rows as the positions they may fill take
        rows_per_position = arch.vision_tokens_per_image // max(arch.connector_tokens_per_image, 1)
        per_frame = max(per_frame, config.data.max_seq_len * rows_per_position // max(frames, 1))
    return RunShape(
        params_vision=census["vision"].total, params_connector=census["connector"].total,
        params_llm=census["llm"].total, params_head=census["head"].total,
        hidden_size=arch.text.hidden, num_layers=arch.text.layers, vocab_size=arch.vocab,
        vision_hidden_size=arch.vision.hidden if arch.vision else 0,
        vision_layers=arch.vision.layers if arch.vision else 0,
        vision_tokens_per_frame=per_frame,
        lm_tokens_per_frame=max(1, arch.connector_tokens_per_image),
        mode=config.train.mode, lora_params=sum(c.lora for c in census.values()),
        freeze_vision="vision" in config.model.freeze, freeze_connector="connector" in config.model.freeze,
        freeze_llm="llm" in config.model.freeze, zero_stage=zero_stage(ds), offload_optimizer=offloads_optimizer(ds),
        world_size=world_size, micro_batch=config.train.micro_batch_size, seq_len=config.data.max_seq_len,
        frames_per_sample=frames,
        param_bytes=2 if compute_dtype(config) == torch.bfloat16 else 4,
        gradient_checkpointing=config.train.gradient_checkpointing)
