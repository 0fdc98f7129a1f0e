"""``hpc-train plan``: the plan of a run on a GPU, what fits, and the matching ``sbatch`` line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hpc_train.config import RunConfig
from hpc_train.data.batching.packing import PlannedPacks, drop_too_long
from hpc_train.models.sequence_parallel import allowed_sizes
from hpc_train.plan.gpus import Gpu
from hpc_train.plan.loader import LoaderTime, describe_loader, loader_time
from hpc_train.plan.planner import (
    CONTEXT_GIB,
    FRAGMENTATION,
    GIB,
    MemoryPlan,
    Planner,
    fits,
    frames_key,
    largest_that_fits,
)
from hpc_train.plan.step_time import EFFICIENCY, STARTUP_S, StepTime, step_time
from hpc_train.train.data_order import total_steps
from hpc_train.train.engine import zero_stage
from hpc_train.train.profile_report import trainability
from profiling.flops import shape_of

TEMPLATES = {"full": "slurm/lora.slurm", "lora": "slurm/lora.slurm", "qlora": "slurm/qlora.slurm"}
"""The SLURM template each mode runs under (the config's mode overrides the template's)."""
FRAGMENTATION_PCT = round(FRAGMENTATION * 100)
STARTUP_MIN = STARTUP_S // 60
_SEARCH_FACTOR = 4
"""Searching up, the largest setting tried is this many times the configured one."""
_ROW_GRAIN = 256
"""Packed row lengths are tried in multiples of this."""
SEARCHES = ("auto", "up", "off")

ZERO3_CONFIG = "ds_configs/zero3.json"
"""What the advice offers a run that does not fit under ZeRO-2."""


@dataclass
class Plan:
    config: RunConfig
    gpu: Gpu | None
    nodes: int
    gpus_per_node: int
    dtype: str
    memory: MemoryPlan
    time: StepTime | None
    largest: dict[str, tuple[int | None, int]] = field(default_factory=dict)
    """Setting -> (the largest value that fits alone, the most that was tried)."""
    advice: list[tuple[str, float]] = field(default_factory=list)
    """(override, needed GiB after it) for each single change that saves memory, best first."""
    seconds: float = 0.0
    loader: LoaderTime | None = None
    """The planned micro-batch through the loader on one core (with a step time, unless asked off)."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else fits(self.memory, self.gpu)


def make_plan(config: RunConfig, gpu: Gpu | None, *, nodes: int = 1, gpus_per_node: int = 1, bf16: bool,
              search: str = "auto", loader: bool = True) -> Plan:
    """Plan ``config`` on ``nodes x gpus_per_node`` ranks of ``gpu`` (None: memory only). ``search``
    for the largest settings that fit: ``auto`` (below the configured ones, when the run does not
    fit), ``up`` (also above them, to 4x, when it fits), ``off``. ``loader``: time the planned
    micro-batch through the loader (:mod:`hpc_train.plan.loader`) when the step time is known."""
    if search not in SEARCHES:
        raise ValueError(f"search={search!r}: expected one of {', '.join(SEARCHES)}")
    started = time.perf_counter()
    planner = Planner(config, nodes * gpus_per_node, bf16=bf16, on_gpu=gpu is not None or _runs_on_gpu_here(config))
    memory = planner.memory()
    timing = None
    if gpu is not None:
        timing = step_time(config, shape_of(planner.architecture), trainability(planner.model, planner.family),
                           memory.batch, gpu, dtype="bf16" if bf16 else "fp32", steps=_steps(planner))
    plan = Plan(config=config, gpu=gpu, nodes=nodes, gpus_per_node=gpus_per_node, dtype="bf16" if bf16 else "fp32",
                memory=memory, time=timing)
    if timing is not None and loader:
        plan.loader = loader_time(config.data, planner.processor, planner.family,
                                  [planner.records[i] for i in memory.batch.indices], gpus_per_node)
    if gpu is not None and (search == "up" or (search == "auto" and not plan.fits)):
        plan.largest = _largest(planner, memory, gpu, up=bool(plan.fits))
    if plan.fits is False:
        plan.advice = _advice(planner, memory)
    plan.seconds = time.perf_counter() - started
    return plan


def _runs_on_gpu_here(config: RunConfig) -> bool:
    import torch

    return config.train.device != "cpu" and torch.cuda.is_available()


def _steps(planner: Planner) -> int:
    config, world = planner.config, planner.data_world
    train = config.train
    if not config.data.packing:
        return total_steps(len(planner.records), micro_batch=train.micro_batch_size, world_size=world,
                           grad_accum=train.grad_accum, epochs=train.epochs, max_steps=train.max_steps)
    lengths, _ = drop_too_long(planner.lengths(config), config.data.max_seq_len)
    packs = PlannedPacks(lengths, config.data.max_seq_len, seed=train.seed, rank=0, world_size=world,
                         rows_per_micro=train.micro_batch_size, grad_accum=train.grad_accum)
    return train.max_steps or max(1, int(train.epochs * packs.steps_per_epoch() + 0.999))


def _largest(planner: Planner, memory: MemoryPlan, gpu: Gpu, *, up: bool) -> dict[str, tuple[int | None, int]]:
    """The largest micro-batch, packed row length and frames per video that fit, each alone, with
    the most that was tried (a value at that limit reads "at least"): above the configured value
    (``up``, the run fits) or below it. One fake step per try, about log2 of the range."""
    config = planner.config

    def fit_with(**change: int) -> bool:
        return fits(planner.memory(planner.with_settings(**change)), gpu)

    def search(current: int, grain: int, key: str) -> tuple[int | None, int]:
        low, high = (current // grain, current * _SEARCH_FACTOR // grain) if up else (1, current // grain - 1)
        if high < max(low, 1):
            return None, current
        best = largest_that_fits(max(low, 1), high, lambda n: fit_with(**{key: n * grain}))
        return (None if best is None else best * grain), high * grain

    out = {"train.micro_batch_size": search(config.train.micro_batch_size, 1, "micro_batch_size")}
    if config.data.packing:
        out["data.max_seq_len"] = search(config.data.max_seq_len, _ROW_GRAIN, "max_seq_len")
    key = frames_key(config)
    if memory.batch.tiles and not config.data.packing:
        out[f"data.video.{key}"] = search(getattr(config.data.video, key), 1, key)
    return out


def _advice(planner: Planner, memory: MemoryPlan) -> list[tuple[str, float]]:
    """Each single change that lowers the need below ``memory``'s, re-planned on the same data
    (with the model that change makes), least need first."""
    from hpc_train.config_file import with_overrides

    config = planner.config
    candidates = []
    train = config.train
    if train.micro_batch_size > 1:
        half = train.micro_batch_size // 2
        candidates.append([f"train.micro_batch_size={half}",
                           f"train.grad_accum={train.grad_accum * train.micro_batch_size // half}"])
    if not train.gradient_checkpointing:
        candidates.append(["train.gradient_checkpointing=true"])
    if train.mode in ("full", "lora"):
        candidates.append(["train.mode=qlora"])
    if "vision" not in config.model.freeze and train.mode == "full":
        candidates.append([f"model.freeze=[{','.join(['vision', *config.model.freeze])}]"])
    if zero_stage(planner.ds) != 3:
        candidates.append([f"deepspeed.config={ZERO3_CONFIG}"])
    if config.data.max_seq_len > 512:
        candidates.append([f"data.max_seq_len={config.data.max_seq_len // 2}"])
    candidates.extend([f"train.sequence_parallel={size}"] for size in _larger_groups(planner))
    needed = memory.needs_gib
    out = []
    for overrides in candidates:
        changed = with_overrides(config, overrides)
        new = planner.changed(changed).memory().needs_gib
        if new < needed:
            out.append((" ".join(overrides), new))
    return sorted(out, key=lambda pair: pair[1])


def _larger_groups(planner: Planner) -> list[int]:
    """Sequence-parallel group sizes above the configured one that the model's heads and the
    world allow (each spreads a micro-batch over more ranks)."""
    text = getattr(planner.architecture, "text_config", planner.architecture)
    now = planner.config.train.sequence_parallel
    return [n for n in allowed_sizes(text, planner.world) if n > now and planner.world % n == 0]


def sbatch_line(plan: Plan, config_arg: str, overrides: list[str]) -> str:
    """The ``sbatch`` command that runs this plan's job."""
    template = TEMPLATES[plan.config.train.mode]
    parts = [f"CONFIG={config_arg}", "sbatch"]
    if plan.nodes > 1:
        parts.append(f"-N {plan.nodes}")
    parts.append(f"--gpus-per-node={plan.gpus_per_node}")
    if plan.time is not None:
        parts.append(f"--time={plan.time.slurm_time()}")
    parts.append(template)
    return " ".join(parts + overrides)


def to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON (bytes and GiB both; the profiling report keeps this beside its measurement)."""
    mem = plan.memory
    out: dict[str, Any] = {
        "config_digest": plan.config.digest(),
        "gpu": plan.gpu.name if plan.gpu else None, "gpu_memory_gib": plan.gpu.memory_gib if plan.gpu else None,
        "nodes": plan.nodes, "gpus_per_node": plan.gpus_per_node, "dtype": plan.dtype,
        "sequence_parallel": plan.config.train.sequence_parallel,
        "zero_stage": mem.states.stage, "peak_allocated_bytes": mem.peak,
        "peak_allocated_gib": round(mem.peak / GIB, 4), "peak_moment": mem.peak_moment,
        "needs_gib": round(mem.needs_gib, 3), "fits": plan.fits,
        "components_bytes": mem.components(), "moments_bytes": mem.moments,
        "batch": {"records": mem.batch.indices, "tokens": mem.batch.tokens, "real_tokens": mem.batch.real_tokens,
                  "tiles": mem.batch.tiles},
        "largest_that_fits": {k: v for k, (v, _) in plan.largest.items()},
        "largest_tried": {k: top for k, (_, top) in plan.largest.items()}, "advice": [{"overrides": o, "needs_gib": round(g, 3)} for o, g in plan.advice],
        "plan_seconds": round(plan.seconds, 2),
    }
    if plan.time is not None:
        t = plan.time
        out["time"] = {"efficiency": list(EFFICIENCY), "peak_tflops": t.peak_tflops,
                       "flops_per_step": t.flops_per_step, "seconds_per_step": [float(f"{s:.4g}") for s in t.seconds],
                       "tokens_per_second": [round(x, 1) for x in t.tokens_per_second], "steps": t.steps,
                       "run_seconds": [round(s) for s in t.run_seconds], "slurm_time": t.slurm_time()}
    if plan.loader is not None and plan.time is not None:
        gpu_s = _micro_seconds(plan)
        out["loader"] = {"seconds_one_core": round(plan.loader.seconds, 4), "workers": plan.loader.workers,
                         "cpus_per_gpu": plan.loader.cpus_per_gpu, "loading_at_once": plan.loader.loaders,
                         "samples_timed": [plan.loader.timed, plan.loader.samples],
                         "videos_decoded_by_gpu": plan.loader.on_gpu,
                         "gpu_seconds": [float(f"{s:.4g}") for s in gpu_s],
                         "headroom": [round(plan.loader.headroom(s), 3) for s in gpu_s],
                         "prepared_seconds_one_core": None if plan.loader.prepared_seconds is None
                         else round(plan.loader.prepared_seconds, 4)}
    return out


def _micro_seconds(plan: Plan) -> tuple[float, float]:
    """The GPU's (fast, slow) seconds for one micro-batch: the step time over its accumulation."""
    accum = plan.config.train.grad_accum
    return plan.time.seconds[0] / accum, plan.time.seconds[1] / accum


def format_plan(plan: Plan, sbatch: str | None = None) -> str:
    """The plan as a user reads it."""
    mem, config = plan.memory, plan.config
    where = f"{plan.world} x {plan.gpu.name}" if plan.gpu else "this machine"
    lines = [f"plan: {config.name} ({config.train.mode}, ZeRO-{mem.states.stage}, {plan.dtype}) on {where} "
             f"({plan.nodes} node(s) x {plan.gpus_per_node})",
             f"hungriest micro-batch: {mem.batch.tokens:,} positions ({mem.batch.real_tokens:,} real tokens), "
             f"{mem.batch.tiles} images/frames/tiles, records {_ids(mem.batch.indices)}"]
    size = config.train.sequence_parallel
    if size > 1:
        lines.append(f"sequence parallelism: each micro-batch shared by {size} ranks (about "
                     f"{-(-mem.batch.tokens // size):,} positions each); the peak is the hungriest rank's")
    have = f" of {plan.gpu.memory_gib:.1f} GiB: {'fits' if plan.fits else 'DOES NOT FIT'}" if plan.gpu else ""
    lines.append(f"peak per rank: {mem.peak / GIB:.2f} GiB allocated (at {mem.peak_moment}); needs "
                 f"{mem.needs_gib:.2f} GiB with {FRAGMENTATION_PCT}% fragmentation and {CONTEXT_GIB:g} GiB "
                 f"CUDA/NCCL context{have}")
    for name, size in mem.components().items():
        lines.append(f"  {name:<32}{size / GIB:>9.3f} GiB")
    if plan.time is not None:
        t = plan.time
        lo, hi = t.run_seconds
        lines.append(f"step time: {t.seconds[0]:.3g}-{t.seconds[1]:.3g} s per optimizer step ({int(EFFICIENCY[1] * 100)}% "
                     f"to {int(EFFICIENCY[0] * 100)}% of the {t.peak_tflops:g} TFLOP/s {plan.dtype} peak), "
                     f"{t.tokens_per_second[0]:,.0f}-{t.tokens_per_second[1]:,.0f} positions/s per GPU; every "
                     "micro-batch as hungry as the one above, so an upper bound for mixed data")
        lines.append(f"run: {t.steps:,} optimizer steps, {lo / 3600:.2f}-{hi / 3600:.2f} h with "
                     f"{STARTUP_MIN} min start-up")
        if plan.loader is not None:
            lines.extend(describe_loader(plan.loader, _micro_seconds(plan)))
    elif plan.gpu is not None:
        lines.append(f"step time: unknown (no datasheet peak for {plan.gpu.name})")
    if plan.largest:
        said = [f"{k}: not even the smallest tried" if v is None else
                f"{k}={v}{' or more (the most tried)' if v == top and plan.fits else ''}"
                for k, (v, top) in plan.largest.items()]
        lines.append(f"largest that fit, each alone: {', '.join(said)}")
    if plan.fits is False:
        if plan.advice:
            lines.append("changes that lower it, best first (each alone; needs after it):")
            lines.extend(f"  {o:<50} {g:6.2f} GiB{'  fits' if plan.gpu and g <= plan.gpu.memory_gib else ''}"
                         for o, g in plan.advice)
        else:
            lines.append("no single change lowers it enough: use more GPUs (ZeRO-3 shards over them) or a "
                         "smaller model")
    if sbatch:
        lines.append(f"sbatch: {sbatch}")
    lines.append(f"(planned in {plan.seconds:.1f} s with fake tensors; see docs/planning.md)")
    return "\n".join(lines)


def _ids(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:8])
    return shown + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")
