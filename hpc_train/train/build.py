"""The build step: a :class:`RunConfig` in, the typed :class:`RunParts` of one run out.

It reads one way: process group → model → data (and the packing plan) → engine (resuming a
checkpoint) → profiler description. Nothing here trains; every check that can fail a run
(output_dir, disk room, data, frame counts) fails here, before the first step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hpc_train.config import RunConfig
from hpc_train.config_file import save_config
from hpc_train.data.batching.sequence_shard import SequenceShards
from hpc_train.data.deferred_videos import DeviceVideos, videos_on_device
from hpc_train.data.pipeline import DataPipeline, build_pipeline
from hpc_train.data.sources.mixture import read_split
from hpc_train.device import choose_device
from hpc_train.dist import (
    DistInfo,
    collective_timeout_s,
    init_distributed,
    say_on_main,
)
from hpc_train.errors import ConfigError, HpcTrainError
from hpc_train.models.adapters import (
    build_param_groups,
    describe_param_groups,
    describe_quantization,
    param_census,
)
from hpc_train.models.attention import use_varlen_attention
from hpc_train.models.image_tokens import image_tokens_always_match, mark_image_tokens_checked
from hpc_train.models.load import pin_revisions, with_family
from hpc_train.models.sequence_parallel import (
    check_sequence_parallel,
    join_sequence_groups,
    media_token_ids,
    use_sequence_parallel,
)
from hpc_train.models.tiled_mlp import use_tiled_mlp
from hpc_train.models.varlen_backend import varlen_backend
from hpc_train.train.checkpoint import Checkpointer, TrainState
from hpc_train.train.data_order import PlannedBatches, total_steps
from hpc_train.train.engine import (
    backward_scale,
    build_optimizer,
    read_ds_config,
    resolve_ds_config,
    zero_stage,
)
from hpc_train.train.logits_tiles import describe_tiles
from hpc_train.train.loss import loss_for
from hpc_train.train.metrics import MetricsLogger
from hpc_train.train.output_dir import (
    OutputError,
    agreed,
    checkpoint_bytes,
    free_bytes,
    output_problem,
    room_problem,
    writing,
)
from hpc_train.train.output_owner import claim_for_run
from hpc_train.train.packing_plan import data_ranks, plan_packing
from hpc_train.train.profile_report import trainability, vision_tower
from hpc_train.train.run_parts import REQUEUE_MARKER, EvalData, RunParts, TrainData, TrainingEngine
from hpc_train.train.schedule import build_scheduler, lr_multiplier
from hpc_train.train.step_timer import NoTimer, StepTimer
from hpc_train.train.trackers import check_trackers, open_trackers
from hpc_train.train.trainable_model import (
    LoadedModel,
    compute_dtype,
    hidden_size,
    load_training_model,
    model_source,
)
from hpc_train.train.vision_cache_setup import open_vision_cache, vision_cache_refusal
from profiling.profiler import DTYPE_NAMES, Profiler


def build_run(config: RunConfig, info: DistInfo) -> RunParts:
    """Join the process group and build every part of the run (collective: all ranks call it)."""
    # A preset or folder of another family fails here, before any collective; one left out is set.
    config = config.model_copy(update={"model": with_family(pin_revisions(config.model))})
    _check_sequence_parallel_mode(config)
    check_trackers(config.train.report_to)
    device = choose_device(info, config.train.device)
    init_distributed(info, device, timeout_s=config.train.collective_timeout_s)
    timeout = collective_timeout_s()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # as SLURM gave them: a shared node need not give 0..n-1
    say_on_main(info, f"topology: {info.describe()}" + (f"; collectives time out after {timeout:g} s" if timeout else "")
         + (f"; CUDA_VISIBLE_DEVICES={visible}" if visible else ""))
    torch.manual_seed(config.train.seed + info.rank)
    training = config.train.mode != "baseline"
    profiler = _profiler(config, info, device, training)
    timer: StepTimer = profiler if profiler is not None else NoTimer()
    with timer.section("setup"):
        _prepare_output(config, info)
        source = model_source(config, info)
        ds = _ds_config(config, info, training, source, device)
        loaded = load_training_model(config, info, device, source, ds)
        attention = _use_our_attention(loaded, device)
        mpu = _sequence_parallel(config, info, loaded)
        if training and config.train.tiled_mlp > 1:
            use_tiled_mlp(loaded.model, loaded.family.name, config.train.tiled_mlp)
            say_on_main(info, f"tiled MLP: each language-model MLP in {config.train.tiled_mlp} tiles of the sequence")
        if training:
            say_on_main(info, f"head and loss: {describe_tiles(loaded.model, config.train, zero_stage(ds))}")
        if image_tokens_always_match(loaded.model.config, loaded.processor, loaded.family.name):
            mark_image_tokens_checked(loaded.model)
        packed = f", packed rows by {attention}" if config.data.packing else ""
        say_on_main(info, f"device: {_describe(device)}, compute dtype {DTYPE_NAMES.get(loaded.dtype, loaded.dtype)}{packed}")
        pipeline = _with_vision_cache(config, info, build_pipeline(config.data, loaded.processor, loaded.family),
                                      loaded, zero_stage(ds), training)
        train = _train_data(config, info, pipeline, loaded, device) if training else None
        evals = _eval_data(config, pipeline)
        engine = _training_engine(config, info, loaded, ds, train.total_steps, mpu) if train is not None else None
        eval_model = engine.engine if engine is not None else _eval_model(loaded, ds)
    if profiler is not None:
        profiler.describe_model(loaded.model.config, trainability(loaded.model, loaded.family))
        tower = vision_tower(loaded.model, loaded.family)
        if tower is not None:
            profiler.count_images(tower)
    loss = loss_for(config.data, config.train, zero=zero_stage(ds), backward_scale=backward_scale(config, ds))
    return RunParts(config=config, info=info, device=device, loaded=loaded, ds=ds, pipeline=pipeline,
                    loss=loss, timer=timer, profiler=profiler, train=train, eval=evals,
                    training=engine, eval_model=eval_model, attention=attention)


def _use_our_attention(loaded: LoadedModel, device: torch.device) -> str:
    """The language model's attention: ours (no device reads for masks), with the kernel for
    packed rows chosen once for this device, dtype and the model's attention dropout."""
    text = loaded.model.config.text_config
    on_cuda = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if on_cuda else None
    dropout = float(getattr(text, "attention_dropout", 0.0) or 0.0)
    backend = varlen_backend(on_cuda, loaded.dtype, capability, dropout=dropout)
    use_varlen_attention(loaded.model, backend)
    return backend


def _check_sequence_parallel_mode(config: RunConfig) -> None:
    if config.train.sequence_parallel > 1 and config.train.mode == "baseline":
        raise ConfigError(f"train.sequence_parallel={config.train.sequence_parallel} splits training steps; a "
                          "baseline run only evaluates, whole samples per rank. Fix: train.sequence_parallel=1")


def _sequence_parallel(config: RunConfig, info: DistInfo, loaded: LoadedModel) -> Any:
    """DeepSpeed's sequence-parallel groups (their ``mpu``) with the model split over them, or None."""
    size = config.train.sequence_parallel
    if size == 1:
        return None
    check_sequence_parallel(loaded.model.config.text_config, size, info.world_size)
    mpu = join_sequence_groups(size)
    use_sequence_parallel(loaded.model, loaded.family.name, mpu)
    say_on_main(info, f"sequence parallelism: {info.world_size // size} groups of {size} ranks (DeepSpeed Ulysses); "
               "each sample's sequence and media are split over its group")
    return mpu


def _data_parallel(config: RunConfig, info: DistInfo) -> str:
    size = config.train.sequence_parallel
    groups = f", each {size} ranks sharing a micro-batch's sequence" if size > 1 else ""
    return f"{data_ranks(config, info)[1]} data-parallel ranks{groups}"


def _profiler(config: RunConfig, info: DistInfo, device: torch.device, training: bool) -> Profiler | None:
    if not config.profile.enabled:
        return None
    return Profiler(device, warmup_steps=config.profile.warmup_steps, rank=info.rank, local_rank=info.local_rank,
                    world_size=info.world_size, workload="training" if training else "evaluation")


def _prepare_output(config: RunConfig, info: DistInfo) -> None:
    output = Path(config.output_dir)
    problem = agreed(output_problem(output))  # before minutes of loading, on every rank
    if problem:
        raise OutputError(problem)
    claim_for_run(output, info.is_main)  # no other run writing there (a second job with the same output_dir)
    if info.is_main:
        with writing(output / "config.resolved.yaml"):
            save_config(config, output / "config.resolved.yaml")
        (output / REQUEUE_MARKER).unlink(missing_ok=True)


def _ds_config(config: RunConfig, info: DistInfo, training: bool, source: Path, device: torch.device
               ) -> dict[str, Any] | None:
    """Training always runs under DeepSpeed; an evaluation only when it asks for ZeRO-3."""
    if not training and zero_stage(read_ds_config(config.deepspeed.config)[0]) != 3:
        return None
    return resolve_ds_config(config, data_ranks(config, info)[1], bf16=compute_dtype(config, device) == torch.bfloat16,
                             hidden_size=hidden_size(source))


def _with_vision_cache(config: RunConfig, info: DistInfo, pipeline: DataPipeline, loaded: LoadedModel,
                       zero: int, training: bool) -> DataPipeline:
    if config.data.vision_cache is None or not training:
        return pipeline
    refusal = vision_cache_refusal(config, loaded)
    if refusal is not None:
        say_on_main(info, refusal)
        return pipeline
    cache = open_vision_cache(config, loaded)
    say_on_main(info, f"vision cache: {config.vision_cache_dir} (training samples found there skip decoding and the "
               "vision tower; the others are stored as they are computed)")
    return pipeline.with_vision_cache(cache, zero_stage=zero)


def _eval_model(loaded: LoadedModel, ds: dict[str, Any] | None) -> Any:
    if ds is None:
        return loaded.model
    import deepspeed

    # Evaluation under ZeRO-3: the engine gathers each layer's partitions as it runs.
    return deepspeed.initialize(model=loaded.model, config=ds)[0]


# -- data ----------------------------------------------------------------------------------

def _train_data(config: RunConfig, info: DistInfo, pipeline: DataPipeline, loaded: LoadedModel,
                device: torch.device) -> TrainData:
    if config.data.train is None:
        raise HpcTrainError("data.train is not set. Fix: pass data.train=PATH")
    records = read_split(config, "train")
    train = config.train
    size = train.sequence_parallel
    on_device = videos_on_device(config, pipeline.family, device)
    dataset = pipeline.dataset(records, frame_share=(info.rank % size, size) if size > 1 else None, cached=True,
                               defer_videos=on_device)
    finish = DeviceVideos(dataset, str(device)) if on_device else None
    rank, world = data_ranks(config, info)
    if config.data.packing:
        packs, steps, efficiency = plan_packing(config, info, pipeline, records)
        return TrainData(dataset=dataset, batches=packs, total_steps=steps, packing_efficiency=efficiency, finish=finish,
                         collate=_sharded(config, info, pipeline, loaded.model.config,
                                          pipeline.packed_collator(rows_per_micro=train.micro_batch_size, cached=True)))
    batches = PlannedBatches(len(dataset), seed=train.seed, rank=rank, world_size=world,
                             micro_batch=train.micro_batch_size, grad_accum=train.grad_accum)
    steps = total_steps(len(records), micro_batch=train.micro_batch_size, world_size=world,
                        grad_accum=train.grad_accum, epochs=train.epochs, max_steps=train.max_steps)
    return TrainData(dataset=dataset, batches=batches, total_steps=steps, finish=finish,
                     collate=_sharded(config, info, pipeline, loaded.model.config, pipeline.collator(cached=True)))


def _sharded(config: RunConfig, info: DistInfo, pipeline: DataPipeline, model_config: Any, collate: Any) -> Any:
    """``collate``, cut to this rank's slice of each micro-batch under sequence parallelism."""
    size = config.train.sequence_parallel
    if size == 1:
        return collate
    return SequenceShards(collate, rank=info.rank % size, size=size, pad_token_id=pipeline.pad_token_id,
                          media_tokens=media_token_ids(model_config, pipeline.family.name))


def _eval_data(config: RunConfig, pipeline: DataPipeline) -> EvalData | None:
    if config.data.eval is None:
        return None
    records = read_split(config, "eval")
    if config.eval.max_samples is not None:
        records = [records[i] for i in range(min(config.eval.max_samples, len(records)))]
    return EvalData(records=records, dataset=pipeline.dataset(records))


# -- engine --------------------------------------------------------------------------------

def _training_engine(config: RunConfig, info: DistInfo, loaded: LoadedModel, ds: dict[str, Any] | None,
                     steps: int, mpu: Any) -> TrainingEngine:
    import deepspeed

    model, train = loaded.model, config.train
    per_checkpoint = _check_room(config, info, checkpoint_bytes(model))
    groups = build_param_groups(model, loaded.family, config)
    optimizer = build_optimizer([g.as_optimizer_group() for g in groups], config, ds, main=info.local_rank == 0)
    scheduler = build_scheduler(optimizer, total_steps=steps, warmup_steps=train.warmup_steps,
                                min_ratio=train.min_lr_ratio)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds, mpu=mpu)
    checkpointer = Checkpointer(Path(config.output_dir) / "checkpoints", info, keep=train.keep_checkpoints,
                                expected_bytes=per_checkpoint)
    state, resumed = _resume(config, info, engine, checkpointer)
    trackers = open_trackers(config, resumed=resumed) if info.is_main else []
    metrics = MetricsLogger(config.output_dir, enabled=info.is_main, resume_step=state.step if resumed else None,
                            trackers=trackers)
    multiplier = lr_multiplier(state.step, total_steps=steps, warmup_steps=train.warmup_steps,
                               min_ratio=train.min_lr_ratio)
    say_on_main(info, f"{train.mode} training, ZeRO-{zero_stage(ds)}, world size {info.world_size}, {steps} optimizer steps "
               f"(micro-batch {train.micro_batch_size} x accumulation {train.grad_accum} x {_data_parallel(config, info)})\n"
               f"{describe_param_groups(param_census(model, loaded.family), groups)}\n"
               f"learning rate at step {state.step}: " + ", ".join(f"{g.name} {g.lr * multiplier:.3g}" for g in groups))
    quantized = describe_quantization(model, loaded.family)
    if quantized:
        say_on_main(info, quantized)
    return TrainingEngine(engine=engine, optimizer=optimizer, checkpointer=checkpointer, state=state,
                          metrics=metrics, first_step=state.step + 1)


def _resume(config: RunConfig, info: DistInfo, engine: Any, checkpointer: Checkpointer) -> tuple[TrainState, bool]:
    """The state to start from: a fresh one, or the newest complete checkpoint's."""
    for said in checkpointer.prepare(resume=config.train.resume):
        say_on_main(info, said)
    latest = None
    if config.train.resume:
        latest, notes = checkpointer.resume_point()
        for note in notes:
            say_on_main(info, f"checkpoints: {note}")
    if latest is None:
        return TrainState(world_size=info.world_size), False
    state = checkpointer.load(engine, latest)
    say_on_main(info, f"resumed from {latest} at step {state.step}")
    return state, True


def _check_room(config: RunConfig, info: DistInfo, per_checkpoint: int) -> int:
    """Stop before the engine starts when not even one checkpoint fits; say so when fewer than
    the run keeps (plus the one written before the oldest goes) do."""
    root = Path(config.output_dir) / "checkpoints"
    problem = agreed(room_problem(root, per_checkpoint, "one checkpoint"))
    if problem:
        raise OutputError(problem)
    keep = config.train.keep_checkpoints
    room = free_bytes(root) // max(per_checkpoint, 1)
    if room < keep + 1:
        say_on_main(info, f"disk: room for {room} checkpoint(s) of about {per_checkpoint / 2**20:.1f} MiB in {root}; "
                   f"the run keeps {keep} (train.keep_checkpoints) and writes the next before removing the "
                   "oldest, so it will stop for space before that. Fix: free space, lower "
                   "train.keep_checkpoints, or use a larger output_dir")
    return per_checkpoint


def _describe(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return f"{device} ({torch.cuda.get_device_name(device)})"


__all__ = ["build_run"]
