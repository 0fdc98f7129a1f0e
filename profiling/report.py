"""The JSON profiling report: one per rank (``profile/rank<k>.json``) and a merged one
(``profile/report.json``), with a schema version and a validator.

Every field is documented in docs/profiling.md ("The profiling report"); a test keeps the two in
step. Times are milliseconds (``*_ms``) or seconds (``*_s``), memory GiB, rates per second.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from profiling.flops import NOTES, ModelShape, Peak, Trainability, mfu, step_flops
from profiling.stats import summarize
from profiling.timers import PHASES, StepRecord

SCHEMA_VERSION = 1
RANK_KIND = "rank"
REPORT_KIND = "report"
WORKLOADS = ("training", "evaluation")


class ReportError(ValueError):
    """A file that is not a profiling report this version can read."""


def _rates(totals: Mapping[str, float], seconds: float) -> dict[str, float] | None:
    if seconds <= 0:
        return None
    return {f"{k}_per_s": totals[k] / seconds for k in ("samples", "tokens", "slot_tokens", "images")}


def flops_section(records: Sequence[StepRecord], shape: ModelShape | None, trainability: Trainability,
                  peak: Peak, *, devices: int = 1, unknown_reason: str | None = None) -> dict[str, Any]:
    """Model FLOPs of the measured steps, achieved TFLOP/s per device and MFU."""
    base: dict[str, Any] = {"forward_per_step": None, "backward_per_step": None,
                            "achieved_tflops_per_device": None, "peak_tflops_per_device": peak.tflops,
                            "peak_source": peak.source, "mfu": None, "notes": list(NOTES)}
    if shape is None or not records:
        base["notes"].append(unknown_reason or "no measured steps")
        return base
    per_step = [step_flops(shape, trainability, tokens=r.tokens, samples=r.samples, images=r.images,
                           context=r.context, vision_rows=r.vision_rows, vision_pairs=r.vision_pairs)
                for r in records]
    seconds = sum(r.step_ms for r in records) / 1000.0
    total = sum(f.total for f in per_step)
    base.update({
        "forward_per_step": sum(f.forward for f in per_step) / len(per_step),
        "backward_per_step": sum(f.backward for f in per_step) / len(per_step),
        "achieved_tflops_per_device": total / seconds / devices / 1e12 if seconds > 0 else None,
        "mfu": mfu(total, seconds, devices, peak),
    })
    return base


def build_rank_report(records: Sequence[StepRecord], *, warmup_excluded: int, rank: int, local_rank: int,
                      world_size: int, host: str, device: str, device_name: str, workload: str,
                      memory: Mapping[str, float | None], flops: Mapping[str, Any],
                      wall_s: Mapping[str, Any], first_step: int = 1,
                      vision_cache: Mapping[str, int] | None = None,
                      prepared_media: Mapping[str, int] | None = None) -> dict[str, Any]:
    """One rank's report from its measured steps (warm-up already left out); ``vision_cache``:
    the whole run's feature-cache counts (samples cached / computed, bytes read), when it had one."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, not {workload!r}")
    measured_s = sum(r.step_ms for r in records) / 1000.0
    totals = {"samples": sum(r.samples for r in records), "tokens": sum(r.tokens for r in records),
              "slot_tokens": sum(r.slot_tokens for r in records), "images": sum(r.images for r in records),
              "measured_s": measured_s}
    phases = {p: summarize(r.phases_ms.get(p, 0.0) for r in records)
              for p in _phases_seen(records)} if records else {}
    seen = len(records) + warmup_excluded
    return {
        "schema_version": SCHEMA_VERSION, "kind": RANK_KIND, "rank": rank, "local_rank": local_rank,
        "world_size": world_size, "host": host, "device": device, "device_name": device_name,
        "workload": workload,
        "steps": {"seen": seen, "warmup_excluded": warmup_excluded, "measured": len(records),
                  "first": first_step, "last": first_step + seen - 1},
        "step_ms": summarize(r.step_ms for r in records) if records else None,
        "phases_ms": phases,
        "phase_coverage": (sum(sum(r.phases_ms.values()) for r in records) / (measured_s * 1000.0)
                           if measured_s > 0 else None),
        "totals": totals,
        "throughput": _rates(totals, measured_s),
        "padding_efficiency": totals["tokens"] / totals["slot_tokens"] if totals["slot_tokens"] else None,
        "memory": dict(memory),
        "flops": dict(flops),
        "wall_s": dict(wall_s),
        **({"vision_cache": _with_hit_rate(vision_cache)} if vision_cache is not None else {}),
        **({"prepared_media": dict(prepared_media)} if prepared_media is not None else {}),
        "series": {"step_ms": [round(r.step_ms, 3) for r in records]},
    }


def _with_hit_rate(counts: Mapping[str, int]) -> dict[str, Any]:
    samples = counts["samples_cached"] + counts["samples_computed"]
    return {**counts, "hit_rate": counts["samples_cached"] / samples if samples else None}


def _phases_seen(records: Sequence[StepRecord]) -> list[str]:
    names = {name for r in records for name in r.phases_ms}
    return [p for p in PHASES if p in names] + sorted(names - set(PHASES))


def merge_reports(ranks: Sequence[Mapping[str, Any]], *, run: Mapping[str, Any],
                  environment: Mapping[str, Any], evaluation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The merged report of all ranks' reports (rank 0 writes it), with the run's evaluation
    figures (loss, metrics, generation throughput) when it evaluated."""
    ranks = _complete_world(ranks)
    world = ranks[0]["world_size"]
    timed = [r for r in ranks if r["step_ms"] is not None]
    slowest = max(timed, key=lambda r: r["step_ms"]["mean"]) if timed else ranks[0]
    fastest = min(timed, key=lambda r: r["step_ms"]["mean"]) if timed else ranks[0]
    # Ranks wait for each other every step: a step lasts as long as its slowest rank's.
    series = [r["series"]["step_ms"] for r in ranks]
    length = min(len(s) for s in series)
    step_ms = summarize(max(s[i] for s in series) for i in range(length)) if length else None
    notes = []
    if len({len(s) for s in series}) > 1:
        notes.append(f"ranks measured different numbers of steps ({', '.join(str(len(s)) for s in series)}); "
                     f"step_ms takes the per-step maximum over the first {length}")
    seconds = max((r["totals"]["measured_s"] for r in ranks), default=0.0)
    totals = {k: sum(r["totals"][k] for r in ranks) for k in ("samples", "tokens", "slot_tokens", "images")}
    throughput = _rates(totals, seconds)
    if throughput is not None:
        for key in list(throughput):
            throughput[f"{key}_per_device"] = throughput[key] / len(ranks)
    memory = {k: _max_or_none(r["memory"].get(k) for r in ranks) for k in ranks[0]["memory"]}
    flops = _merged_flops(ranks, slowest, seconds)
    hosts = sorted({r["host"] for r in ranks})
    per_rank = [{k: v for k, v in r.items() if k != "series"} for r in ranks]
    return {
        "schema_version": SCHEMA_VERSION, "kind": REPORT_KIND,
        "created_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "workload": ranks[0]["workload"],
        "run": {**run, "world_size": world, "nodes": len(hosts)},
        "environment": {**environment, "hosts": hosts,
                        "gpu_count": sum(r["device"].startswith("cuda") for r in ranks)},
        "steps": dict(slowest["steps"]),
        "step_ms": step_ms,
        "phases_ms": slowest["phases_ms"],
        "phase_coverage": slowest["phase_coverage"],
        "throughput": throughput,
        "padding_efficiency": totals["tokens"] / totals["slot_tokens"] if totals["slot_tokens"] else None,
        "memory": memory,
        "flops": flops,
        "wall_s": dict(ranks[0]["wall_s"]),
        **_merged_vision_cache(ranks),
        **_merged_prepared_media(ranks),
        **({"evaluation": dict(evaluation)} if evaluation is not None else {}),
        "notes": notes,
        "slowest_rank": {
            "rank": slowest["rank"], "host": slowest["host"],
            "step_ms_mean": slowest["step_ms"]["mean"] if slowest["step_ms"] else None,
            "fastest_rank": fastest["rank"],
            "fastest_step_ms_mean": fastest["step_ms"]["mean"] if fastest["step_ms"] else None,
        },
        "per_rank": per_rank,
    }


def _merged_vision_cache(ranks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    counted = [r["vision_cache"] for r in ranks if "vision_cache" in r]
    if not counted:
        return {}
    keys = ("samples_cached", "samples_computed", "bytes_read")
    return {"vision_cache": _with_hit_rate({k: sum(c[k] for c in counted) for k in keys})}


def _merged_prepared_media(ranks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    counted = [r["prepared_media"]["videos_unprepared"] for r in ranks if "prepared_media" in r]
    return {"prepared_media": {"videos_unprepared": sum(counted)}} if counted else {}


def _complete_world(ranks: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The valid rank reports of one workload, one per rank of the world, in rank order."""
    if not ranks:
        raise ReportError("no rank reports to merge")
    for r in ranks:
        validate(r, RANK_KIND)
    ranks = sorted(ranks, key=lambda r: r["rank"])
    numbers = [r["rank"] for r in ranks]
    world = ranks[0]["world_size"]
    if numbers != list(range(world)):
        raise ReportError(f"rank reports {numbers} do not cover ranks 0..{world - 1} of a world of {world}")
    workloads = {r["workload"] for r in ranks}
    if len(workloads) > 1:
        raise ReportError(f"rank reports mix workloads {sorted(workloads)}")
    return ranks


def _merged_flops(ranks: Sequence[Mapping[str, Any]], slowest: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """The slowest rank's FLOP figures, with the achieved rate averaged over every rank's time."""
    flops = dict(slowest["flops"])
    achieved = [r["flops"]["achieved_tflops_per_device"] for r in ranks]
    if all(a is not None for a in achieved) and seconds > 0:
        total = sum(a * r["totals"]["measured_s"] for a, r in zip(achieved, ranks, strict=True)) * 1e12
        flops["achieved_tflops_per_device"] = total / seconds / len(ranks) / 1e12
        peak = flops["peak_tflops_per_device"]
        flops["mfu"] = flops["achieved_tflops_per_device"] / peak if peak else None
    return flops


def _max_or_none(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


# -- validation -------------------------------------------------------------------------

_NUM = (int, float)
_STATS = dict
_COMMON: dict[str, Any] = {
    "schema_version": int, "kind": str, "workload": str, "steps": dict, "step_ms": (_STATS, type(None)),
    "phases_ms": dict, "phase_coverage": (*_NUM, type(None)), "throughput": (dict, type(None)),
    "padding_efficiency": (*_NUM, type(None)), "memory": dict, "flops": dict, "wall_s": dict,
}
_REQUIRED: dict[str, dict[str, Any]] = {
    RANK_KIND: {**_COMMON, "rank": int, "local_rank": int, "world_size": int, "host": str, "device": str,
                "device_name": str, "totals": dict, "series": dict},
    REPORT_KIND: {**_COMMON, "created_utc": str, "run": dict, "environment": dict, "slowest_rank": dict,
                  "per_rank": list, "notes": list},
}


def validate(report: Any, kind: str | None = None, *, source: str = "report") -> dict[str, Any]:
    """Check ``report`` against the schema; returns it, or raises :class:`ReportError` naming
    the field and what was expected."""
    found = _check_header(report, kind, source)
    for key, types in _REQUIRED[found].items():
        if key not in report:
            raise ReportError(f"{source}: field {key!r} is missing")
        if not isinstance(report[key], types) or isinstance(report[key], bool) and types in (int, _NUM):
            raise ReportError(f"{source}: field {key!r} has type {type(report[key]).__name__}")
    if report["workload"] not in WORKLOADS:
        raise ReportError(f"{source}: workload {report['workload']!r} is not one of {WORKLOADS}")
    _check_stats(report, source)
    if found == REPORT_KIND:
        for i, rank in enumerate(report["per_rank"]):
            validate({**rank, "series": {"step_ms": []}}, RANK_KIND, source=f"{source}: per_rank[{i}]")
    else:
        _check_rank_numbers(report, source)
    return report


def _check_header(report: Any, kind: str | None, source: str) -> str:
    """The report's kind, once its schema version and kind are the expected ones."""
    if not isinstance(report, dict):
        raise ReportError(f"{source}: expected a JSON object, found {type(report).__name__}")
    version = report.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportError(f"{source}: schema_version is {version!r}; this hpc-profile reads version "
                          f"{SCHEMA_VERSION}" + (" (is this a profiling report?)" if version is None else
                                                 ". Fix: use the hpc-profile of the toolkit that wrote it"))
    found = report.get("kind")
    if found not in _REQUIRED:
        raise ReportError(f"{source}: kind is {found!r}, expected 'report' or 'rank'")
    if kind is not None and found != kind:
        hint = (" Fix: pass the merged profile/report.json, or merge rank files with hpc-profile merge"
                if kind == REPORT_KIND else "")
        raise ReportError(f"{source}: is a {found!r} file, expected {kind!r}.{hint}")
    return found


def _check_stats(report: dict[str, Any], source: str) -> None:
    stats = [("step_ms", report["step_ms"])] + [(f"phases_ms.{p}", s) for p, s in report["phases_ms"].items()]
    for name, value in stats:
        if value is None:
            continue
        for stat in ("count", "mean", "median", "p95", "min", "max", "std"):
            if not isinstance(value, dict) or not isinstance(value.get(stat), _NUM):
                raise ReportError(f"{source}: {name}.{stat} is missing or not a number")


def _check_rank_numbers(report: dict[str, Any], source: str) -> None:
    for key in ("samples", "tokens", "slot_tokens", "images", "measured_s"):
        if not isinstance(report["totals"].get(key), _NUM):
            raise ReportError(f"{source}: totals.{key} is missing or not a number")
    steps = report["series"].get("step_ms")
    if not isinstance(steps, list) or not all(isinstance(v, _NUM) for v in steps):
        raise ReportError(f"{source}: series.step_ms must be a list of numbers")
    if not isinstance(report["flops"].get("achieved_tflops_per_device", 0), (*_NUM, type(None))):
        raise ReportError(f"{source}: flops.achieved_tflops_per_device is not a number")


def read_report(path: str | Path, kind: str | None = REPORT_KIND) -> dict[str, Any]:
    """A validated report from ``path`` (errors name the file)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ReportError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    return validate(data, kind, source=str(path))


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
