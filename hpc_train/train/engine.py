"""DeepSpeed config resolution and ``deepspeed.initialize``.

The shipped JSON files stay readable and may say ``"auto"``; every such value is filled
from the RunConfig here, before DeepSpeed sees the dict, and none may be left over. The
optimizer is always ours (AdamW over per-group parameter lists), so a DeepSpeed config with
its own ``optimizer`` or ``scheduler`` block is refused: DeepSpeed would otherwise silently
replace the per-group learning rates with one global rate.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from hpc_train.config import RunConfig
from hpc_train.errors import ConfigError
from hpc_train.extensions import announce_build

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def read_ds_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The DeepSpeed JSON at ``path`` (relative paths also tried against the package root)."""
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates.append(PACKAGE_ROOT / path)
    for candidate in candidates:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), candidate
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{candidate}:{exc.lineno}: not valid JSON ({exc.msg}). "
                                  "Fix: correct the DeepSpeed config") from exc
    shipped = sorted(p.name for p in (PACKAGE_ROOT / "ds_configs").glob("*.json"))
    raise ConfigError(f"deepspeed.config={path}: no such file. Fix: use one of ds_configs/ "
                      f"({', '.join(shipped)}) or a path to your own")


def resolve_ds_config(config: RunConfig, world_size: int, *, bf16: bool,
                      hidden_size: int) -> dict[str, Any]:
    """The concrete DeepSpeed dict for this run: no ``"auto"`` left, batch sizes consistent.
    ``world_size``: the ranks that read different data (sequence-parallel groups count once)."""
    raw, source = read_ds_config(config.deepspeed.config)
    for block in ("optimizer", "scheduler"):
        if block in raw:
            raise ConfigError(
                f"{source}: has an '{block}' block. hpc-train builds the optimizer and schedule "
                "itself so that per-group learning rates (train.lr_groups) are the ones applied; "
                f"DeepSpeed would silently replace them. Fix: delete the '{block}' block and set "
                "train.lr / train.lr_groups / train.betas / train.weight_decay / train.warmup_steps")
    ds = copy.deepcopy(raw)
    train = config.train
    micro, accum = train.micro_batch_size, train.grad_accum
    _fill(ds, "train_micro_batch_size_per_gpu", micro, source)
    _fill(ds, "gradient_accumulation_steps", accum, source)
    _fill(ds, "train_batch_size", micro * accum * world_size, source)
    _fill(ds, "gradient_clipping", train.grad_clip or 0.0, source)
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", bf16, source, key_path="bf16.enabled")
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{source}: fp16 is not supported (loss scaling interacts badly with "
                          "4-bit and vision towers). Fix: remove the fp16 block; bf16 is used where available")
    ds.pop("fp16", None)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    _check_skips_nonfinite_steps(ds, source)
    # Gradient buckets: at least 50M elements, so a small model is reduced in a few
    # collectives instead of one per layer (each collective has a fixed latency).
    bucket = max(hidden_size * hidden_size, 50_000_000)
    for key, value in (("reduce_bucket_size", bucket),
                       ("allgather_bucket_size", bucket),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if key in zero:
            _fill(zero, key, value, source, key_path=f"zero_optimization.{key}")
    if config.train.sequence_parallel > 1:
        # read by DeepSpeed where no mpu is given (transformers' zero.Init at load under ZeRO-3)
        ds["sequence_parallel_size"] = config.train.sequence_parallel
        if zero.get("stage") == 3 and zero.get("reduce_scatter") is False:
            raise ConfigError(
                f"{source}: zero_optimization.reduce_scatter=false under ZeRO-3 with train.sequence_parallel: DeepSpeed "
                "then averages some gradient buckets over the sequence-parallel group and others not, so the "
                "gradients would be wrong. Fix: remove reduce_scatter (it defaults to true)")
    left = _autos(ds)
    if left:
        raise ConfigError(f"{source}: no value is known for {', '.join(left)}. Fix: give numbers there")
    expected = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    if ds["train_batch_size"] != expected:
        raise ConfigError(
            f"{source}: train_batch_size={ds['train_batch_size']} but micro_batch "
            f"({ds['train_micro_batch_size_per_gpu']}) x grad_accum ({ds['gradient_accumulation_steps']}) "
            f"x world_size ({world_size}) = {expected}. Fix: set train_batch_size to \"auto\"")
    return ds


def _check_skips_nonfinite_steps(ds: dict[str, Any], source: str) -> None:
    """A step with a non-finite loss is skipped by DeepSpeed's overflow check (the loop sends
    it a NaN gradient): refuse the settings under which DeepSpeed would apply it instead."""
    zero = ds["zero_optimization"]
    problem = None
    if int(zero.get("stage", 0)) == 0:
        problem = "ZeRO stage 0 (or no zero_optimization block) has no overflow check in fp32 / bf16"
    elif zero.get("compute_grad_norm") is False:
        problem = "zero_optimization.compute_grad_norm=false turns its overflow check off"
    elif ds["bf16"].get("check_grad_overflow") is False:
        problem = "bf16.check_grad_overflow=false turns its overflow check off"
    if problem:
        raise ConfigError(
            f"{source}: {problem}, so an optimizer step with a non-finite loss would be applied to the weights "
            "instead of skipped. Fix: use ZeRO stage 1, 2 or 3 (ds_configs/zero2.json) with the overflow check on")


def zero_stage(ds: dict[str, Any] | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 without one): the one place it is read."""
    return int((ds or {}).get("zero_optimization", {}).get("stage", 0))


def share_scale(ds: dict[str, Any] | None, sequence_parallel: int) -> float:
    """What a rank's share of a micro-batch's loss is multiplied by before its backward, so
    DeepSpeed's reduction sums the shares of a sequence-parallel group (and averages over the
    data-parallel ranks). ZeRO-1/2 divide by the data-parallel ranks only; ZeRO-3's
    reduce-scatter (0.19.8) by every rank, the group's too, so it gets the group size back."""
    return float(sequence_parallel) if sequence_parallel > 1 and zero_stage(ds) == 3 else 1.0


def backward_scale(config: RunConfig, ds: dict[str, Any] | None) -> float:
    """What the loop's backward multiplies a micro-batch's loss by: DeepSpeed's 1 / grad_accum
    and :func:`share_scale`."""
    return share_scale(ds, config.train.sequence_parallel) / config.train.grad_accum


def offloads_optimizer(ds: dict[str, Any] | None) -> bool:
    """Whether a DeepSpeed config moves the optimizer state to CPU memory."""
    device = (ds or {}).get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def build_optimizer(groups: list[dict[str, Any]], config: RunConfig, ds: dict[str, Any], *, main: bool = True
                    ) -> torch.optim.Optimizer:
    """AdamW over the per-group parameter lists (DeepSpeed's CPU Adam when it offloads).
    ``main``: this process says so when CPU Adam still has to be compiled.

    torch's fused kernel where every weight allows it (HF Trainer's default too): one pass over
    the weights instead of one per operation, and no full-size temporaries. Under ZeRO the
    optimizer steps a handful of large flattened partitions, so the unfused path's passes are
    the whole cost (profiled in ``benchmarks/peers.py``'s arms on the CPU: 2.7x the fused call)."""
    betas = tuple(config.train.betas)
    if offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        announce_build("cpu_adam", "CPU Adam for optimizer offload", main=main)
        return DeepSpeedCPUAdam(groups, lr=config.train.lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=betas, fused=fused_allowed(groups))


_FUSED_DEVICES = ("cpu", "cuda")


def fused_allowed(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW takes every weight of ``groups``: floating point, on a CPU or GPU."""
    return all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for g in groups for p in g["params"])


def _fill(node: dict[str, Any], key: str, value: Any, source: Path, *, key_path: str | None = None) -> None:
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps") and current != value:
        raise ConfigError(
            f"{source}: {key_path or key}={current} disagrees with the run's value {value}. Fix: set it "
            "to \"auto\" (the RunConfig is the single source of batch sizes)")


def _autos(node: Any, prefix: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _autos(value, f"{prefix}{key}.")
    elif node == "auto":
        found.append(prefix.rstrip("."))
    return found
