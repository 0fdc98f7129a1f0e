"""The one typed configuration of a run: every section, its defaults and its checks.

Config is data, validated once; :mod:`hpc_train.config_file` reads it from YAML and overrides,
and the resolved config is what a run saves.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from hpc_train.evaluation import METRICS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    """Which model to train and how to load it."""

    family: Literal["smolvlm", "smolvlm2", "llava_onevision", "llava_onevision_1_5"] = "smolvlm"
    """Model family: ``smolvlm`` (SmolVLM, transformers' Idefics3), ``smolvlm2`` (SmolVLM2,
    transformers' SmolVLM), ``llava_onevision`` or ``llava_onevision_1_5`` (LLaVA-OneVision-1.5,
    RICE-ViT + Qwen3). Leave it out with ``model.path`` or a published
    ``model.preset``: the folder's ``config.json`` (its ``model_type``) or the preset says it;
    ``smolvlm`` for ``preset: tiny``."""
    path: str | None = None
    """A folder written by ``save_pretrained`` (model + processor), or a Hugging Face hub id
    (``org/name``, ``org/name@revision``) read offline from the local cache (``HF_HOME`` /
    ``HF_HUB_CACHE``; fill it with ``hpc-train download org/name``). Runs pin it to the commit
    resolved (``config.resolved.yaml``); nothing is downloaded during a run."""
    preset: str | None = None
    """Build the model from a known config instead of loading ``path`` (random weights, offline
    processor): ``tiny`` (a CPU-sized model of ``family``) or a published architecture:
    ``smolvlm-256m``, ``smolvlm-500m``, ``smolvlm-2.2b``, ``smolvlm2-256m``, ``smolvlm2-500m``,
    ``smolvlm2-2.2b``, ``llava-onevision-0.5b``, ``llava-onevision-7b``, ``llava-onevision-1.5-4b``,
    ``llava-onevision-1.5-8b``."""
    adapter: str | None = None
    """A LoRA adapter applied on top of the model: a folder (written by a lora/qlora run) or a hub id,
    as for ``path``."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Parameter and compute dtype: ``auto`` is bf16 on a GPU that has it, fp32 otherwise."""
    freeze: list[Literal["vision", "connector", "llm"]] = []
    """Module groups whose weights stay fixed (bit-identical after training)."""


class VideoConfig(_Section):
    """How frames are picked from a video."""

    sampling: Literal["uniform", "fps"] = "uniform"
    """``uniform``: exactly ``num_frames`` spread over the clip; ``fps``: ``fps`` frames per second."""
    num_frames: int = Field(8, ge=1)
    """Frames per video in ``uniform`` mode."""
    fps: float = Field(1.0, gt=0)
    """Frames per second in ``fps`` mode."""
    max_frames: int = Field(32, ge=1)
    """Upper bound on frames per video in either mode."""
    split_frames: bool = False
    """SmolVLM (which takes a video as a run of images): split each frame into tiles as an image
    is, instead of one tile a frame. At the published 512-px tiles and 2048-px long edge a split
    frame costs up to 17 tiles (1,088 tokens) against 64. SmolVLM2 and LLaVA-OneVision have a
    video path of their own and never split frames. A sample holding images too has its frames
    split as its images are (the processor splits all of a call's images alike)."""
    backend: Literal["auto", "decord", "torchcodec"] = "auto"
    """The video decoder: ``torchcodec`` (PyTorch's; FFmpeg from the PyAV wheel or the system),
    ``decord``, or ``auto``: torchcodec where it loads, else decord. Both pick the same frames;
    pixels may differ by a few grey levels (benchmarks/RESULTS.md)."""
    max_side: int | None = Field(None, ge=32)
    """Scale frames whose longer side exceeds this many pixels down to it, in the decoder (aspect
    kept): fewer tokens where the processor keeps frames near their size (LLaVA-OneVision-1.5
    gives a 1080p frame about 2,700) and a smaller ``data.prepared_media``. The decoder's filter
    differs from the processor's own resize by a few grey levels; decoding is not faster (the
    codec's work is the same). ``null``: frames as the file has them."""
    decoder_threads: int = Field(1, ge=0)
    """Decoder threads per video: 1 when ``data.num_workers`` fill the CPUs (the default); more
    where the rank has idle cores (a 1080p decode ran 1.7x faster on 2 threads), 0: the decoder's
    own choice (every core)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where training videos are decoded: ``cpu`` in the DataLoader workers; ``cuda`` by the GPU's
    decoder (torchcodec, NVDEC) in the training process, the workers encoding each sample from
    stand-in frames of the same size. Evaluation decodes on the CPU. Needs torchcodec's CUDA build."""


class ImageConfig(_Section):
    """How images are prepared before the processor sees them."""

    aspect_4to1: bool = False
    """Letterbox every image onto a 4:1 (width:height) canvas, as wide-strip encoders prefer."""
    max_side: int | None = Field(None, ge=8)
    """Downscale images whose longer side exceeds this many pixels (``null``: keep)."""


class AudioConfig(_Section):
    """How ``<speech>`` clips are read and shown to the model."""

    sample_rate: int = Field(16000, ge=1000)
    """Resample every clip to this rate (mono)."""
    max_seconds: float | None = Field(None, gt=0)
    """Cut clips longer than this (``null``: keep whole)."""
    image_size: int = Field(64, ge=16)
    """Side of the log-mel spectrogram picture the vision tower sees for a clip."""


class DataConfig(_Section):
    """Where the data is and how samples are built."""

    train: str | None = None
    """Training set: a JSON / JSONL file, or a YAML mixture of several."""
    eval: str | None = None
    """Evaluation set (same forms as ``train``)."""
    media_root: str | None = None
    """Folder media paths are relative to (default: the dataset file's folder)."""
    allow_media_outside_root: bool = False
    """Accept media paths that resolve outside ``media_root`` (absolute, or ``../``); off, such a
    record is refused, so a shared dataset cannot make the job read other files."""
    ids_file: str | None = None
    """Keep only the record ids listed in this file (one per line)."""
    max_seq_len: int = Field(2048, ge=16)
    """Longest tokenised sample (text + media tokens)."""
    truncation: Literal["drop", "error"] = "drop"
    """A sample longer than ``max_seq_len``: ``drop`` it (counted) or stop with an error.
    Samples are never cut inside an image's tokens."""
    on_bad_sample: Literal["skip", "error"] = "error"
    """A record with a missing or corrupt media file: ``skip`` it (counted) or stop with an error."""
    system_prompt: str | None = None
    """System turn added to records that have none (``null``: none)."""
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank; media are decoded inside each worker."""
    packing: bool = False
    """Pack several samples into each row of ``max_seq_len`` tokens (best-fit decreasing), with a
    varlen attention so no sample sees another; ``train.micro_batch_size`` then counts rows."""
    packing_loss: Literal["token", "sample"] = "token"
    """With packing: ``token`` averages over every supervised token of the row (the same as
    the unpacked samples together); ``sample`` averages each sample's own token mean, so short
    answers weigh as much as long ones."""
    cache_samples: bool = False
    """Keep every encoded sample in memory after its first use (each worker keeps its own):
    for small datasets trained for many epochs."""
    vision_cache: str | None = None
    """A folder (on the filesystem the checkpoints use; ``{output_dir}`` is filled in) of the
    features a frozen vision tower and connector hand the language model, per training sample: a
    sample found there is trained without decoding its media or running the tower. Written as
    samples are first computed (or ahead, by ``hpc-train cache-vision``); an entry whose weights,
    media settings or media files changed is never used. Off when anything in the tower or
    connector trains (the run says why)."""

    prepared_media: str | None = None
    """A folder of videos' frames decoded once (``hpc-train prepare-media``), as this run samples
    them and its processor first resizes them: a video found there is not decoded again. An
    entry whose file, sampling or processor settings changed is never used; a video missing
    there is decoded (and said). Fill it ahead on CPU nodes (``slurm/prepare_media.slurm``)."""

    @field_validator("vision_cache")
    @classmethod
    def _cache_placeholder(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.format(output_dir="output_dir")
            except (KeyError, IndexError, ValueError, AttributeError):
                raise ValueError(f"{value!r} may only use the placeholder {{output_dir}}") from None
        return value
    video: VideoConfig = VideoConfig()
    image: ImageConfig = ImageConfig()
    audio: AudioConfig = AudioConfig()


class TrainConfig(_Section):
    """Optimisation settings."""

    mode: Literal["baseline", "full", "lora", "qlora"] = "lora"
    """``baseline`` evaluates only; ``full`` trains every unfrozen weight; ``lora`` / ``qlora`` train adapters."""
    device: Literal["auto", "cpu"] = "auto"
    """``auto``: this rank's GPU when CUDA works, the CPU when the job has no GPU (a job given GPUs
    on which CUDA does not work stops); ``cpu``: the CPU on purpose, whatever the job was given."""
    collective_timeout_s: float = Field(1800.0, gt=0)
    """Seconds a rank waits in a collective for the others before the run stops (NCCL's / gloo's
    process-group timeout): raise it when one rank's work between collectives takes longer (a
    slow filesystem's checkpoint save, a long evaluation on rank 0)."""
    micro_batch_size: int = Field(1, ge=1)
    """Samples per rank per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training set (ignored when ``max_steps`` is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_groups: dict[Literal["vision", "connector", "llm", "head"], float] = {}
    """Peak learning rate per module group (e.g. ``{vision: 5e-6, connector: 1e-4}``); groups
    not listed use ``lr``."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up from 0 to the peak rate over this many optimizer steps."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at this fraction of the peak rate."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (``null``: no clipping)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    tiled_mlp: int = Field(0, ge=0)
    """Compute each language-model MLP over this many tiles of the sequence, recomputed in the
    backward (DeepSpeed's TiledMLP; 0 or 1: whole): its intermediate activations, 3-4x the
    hidden size per token, then exist for one tile at a time, for one more MLP forward a step."""
    logits_tile_mib: float = Field(256.0, gt=0)
    """The head and loss run over tiles of a micro-batch's supervised positions whose fp32 logits
    stay within this size (DeepSpeed's TiledFusedLogitsLoss), once those logits would pass it:
    long captions and text-heavy rows then hold one tile's logits at a time."""
    sequence_parallel: int = Field(1, ge=1)
    """Ranks that share one micro-batch's sequence (DeepSpeed's Ulysses; 1: off). The world size
    must be a multiple of it; data parallelism runs over the rest. The language model's heads
    must split evenly over it (the sizes each model allows: docs/long-videos.md)."""
    log_every: int = Field(1, ge=1)
    """Write a metrics line every N optimizer steps."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    """Experiment trackers that get the scalars of ``metrics.jsonl`` (always written), from rank 0,
    with the run's name and resolved config: ``tensorboard`` (``OUTPUT_DIR/tensorboard``),
    ``wandb`` (``WANDB_PROJECT``, default ``hpc-train``; ``WANDB_MODE=offline`` on nodes without
    internet), ``mlflow`` (``MLFLOW_TRACKING_URI``, default ``OUTPUT_DIR/mlflow.db``;
    ``MLFLOW_EXPERIMENT_NAME``, default ``hpc-train``); ``[]``: none. A resumed run goes on in the
    same tracker runs. wandb and mlflow come with the ``trackers`` extra."""

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"names {', '.join(twice)} more than once")
        return value
    eval_every: int = Field(0, ge=0)
    """Evaluate on ``data.eval`` every N optimizer steps (0: only at the end)."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a lower eval loss (``null``: never)."""
    save_every: int = Field(0, ge=0)
    """Save a checkpoint every N optimizer steps (0: only at the end and on a signal)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many step checkpoints to keep on disk (oldest removed first)."""
    max_bad_steps: int = Field(0, ge=0)
    """Optimizer steps with a non-finite loss or gradient to skip before the run stops."""
    resume: bool = True
    """Resume from the newest checkpoint in ``output_dir/checkpoints`` that verifies; ``false`` starts
    over and moves the old checkpoints to ``checkpoints.before-<time>/``."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""


class LoraConfig(_Section):
    """LoRA / QLoRA adapters (used when ``train.mode`` is ``lora`` or ``qlora``)."""

    r: int = Field(16, ge=1)
    """Adapter rank."""
    alpha: float = Field(32.0, gt=0)
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target: Literal["llm", "llm+connector", "all"] = "llm"
    """Which linear layers get adapters: the language model's, plus the connector's, or all."""
    double_quant: bool = True
    """QLoRA: quantize the 4-bit quantization constants too (saves ~0.4 bit per weight)."""
    merge_on_export: bool = False
    """Also write a merged full model next to the adapter at the end of training."""


class DeepSpeedConfig(_Section):
    """Which DeepSpeed config to use; ``"auto"`` values in it are filled from this RunConfig."""

    config: str = "ds_configs/zero2.json"
    """Path to a DeepSpeed JSON (ZeRO-2: ``zero2.json``, ZeRO-3: ``zero3.json``, ``zero3_offload.json``)."""


class EvalConfig(_Section):
    """Evaluation (``hpc-train eval`` and evaluation during training)."""

    batch_size: int = Field(8, ge=1)
    """Samples per rank per evaluation forward / generate call."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Generation length; ``null``: the longest reference (answer or ``references``) in tokens + 2."""
    max_samples: int | None = Field(None, ge=1)
    """Evaluate at most this many samples (``null``: the whole split)."""
    generate: bool = True
    """Also generate answers greedily and score them with ``eval.metrics``."""
    metrics: str | list[str] = "auto"
    """Scores of the generated answers: ``auto`` (exact match and SQuAD token F1, plus BLEU-4,
    ROUGE-L and CIDEr-D when the median reference has 5 words or more), or a list of them."""

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: str | list[str]) -> str | list[str]:
        names = [] if value == "auto" else [value] if isinstance(value, str) else value
        if not set(names) <= set(METRICS) or value == []:
            raise ValueError(f"{value!r} is not auto or a list of metrics from {', '.join(METRICS)}")
        return names or "auto"


class ProfileConfig(_Section):
    """The profiler: phase timing, throughput, memory and MFU to ``output_dir/profile/``."""

    enabled: bool = True
    """Write ``profile/rank<k>.json`` and the merged ``profile/report.json``."""
    warmup_steps: int = Field(2, ge=0)
    """Steps left out of the statistics (a run shorter than this keeps its last step)."""
    copy_to: str | None = None
    """Also copy ``report.json`` here; ``{mode}`` and ``{name}`` are filled in (recipes:
    ``results/profiling/{mode}_profiling.json``)."""

    @field_validator("copy_to")
    @classmethod
    def _placeholders(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.format(mode="mode", name="name")
            except (KeyError, IndexError, ValueError, AttributeError):
                raise ValueError(f"{value!r} may only use the placeholders {{mode}} and {{name}}") from None
        return value


class RunConfig(_Section):
    """Everything one run needs. Load with :func:`load_config`."""

    name: str = "run"
    """Short name of the run, used in output paths and reports."""
    output_dir: str = "runs/run"
    """Where checkpoints, metrics and reports go."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    eval: EvalConfig = EvalConfig()
    profile: ProfileConfig = ProfileConfig()
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        """The same settings, wherever each was set."""
        if not isinstance(other, RunConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable, like every pydantic model

    @property
    def vision_cache_dir(self) -> str | None:
        """``data.vision_cache`` with ``{output_dir}`` filled in."""
        cache = self.data.vision_cache
        return None if cache is None else cache.format(output_dir=self.output_dir)

    def origin(self, key: str) -> str | None:
        """Where the dotted ``key`` was set: ``file:line``, ``override 'k=v'``, or ``None`` (default)."""
        return self._origins.get(key)

    def mixed_origin_note(self, key: str, other: str) -> str | None:
        """A note naming both, when one of two settings that belong together came from the config
        file and the other from an override (a recipe's media folder kept for an overridden dataset)."""
        mine, theirs = self.origin(key), self.origin(other)
        if mine is None or theirs is None or mine.startswith("override") == theirs.startswith("override"):
            return None
        return f"{key} was set by {mine}, but {other} by {theirs}"

    @model_validator(mode="after")
    def _check_model_source(self) -> RunConfig:
        if (self.model.path is None) == (self.model.preset is None):
            raise ValueError(
                "set exactly one of model.path (a saved model folder or hub id) and model.preset (e.g. tiny)"
            )
        return self

    @model_validator(mode="after")
    def _check_video_bounds(self) -> RunConfig:
        video = self.data.video
        if video.sampling == "uniform" and video.num_frames > video.max_frames:
            raise ValueError(
                f"data.video.num_frames ({video.num_frames}) exceeds data.video.max_frames "
                f"({video.max_frames}); raise max_frames or lower num_frames"
            )
        if video.device == "cuda" and (video.backend == "decord" or self.train.sequence_parallel > 1):
            raise ValueError("data.video.device=cuda decodes with torchcodec, whole videos: it takes neither "
                             "data.video.backend=decord nor train.sequence_parallel > 1 (a rank's frame share); "
                             "set data.video.device=cpu for those")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as it would be written to YAML."""
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A short stable hash of the resolved config (reports name runs by it)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
