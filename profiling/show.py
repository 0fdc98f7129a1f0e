"""A readable summary of one report (``hpc-profile show``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from profiling.compare import DASH, lookup
from profiling.stats import STAT_KEYS


def _num(value: Any, unit: str = "", digits: int = 4) -> str:
    if value is None:
        return DASH
    return f"{value:.{digits}g}{unit}"


def show(report: Mapping[str, Any]) -> str:
    run, env = report["run"], report["environment"]
    steps = report["steps"]
    zero = run.get("zero_stage")
    batch = (f"micro-batch {run.get('micro_batch_size')} x accumulation {run.get('grad_accum')}"
             if report["workload"] == "training" else f"batch {run.get('eval_batch_size')}")
    lines = [
        f"{report['workload']} run {run.get('name', '?')!s}: mode {run.get('mode')}, model {run.get('model')}",
        f"  {'no DeepSpeed' if zero is None else f'ZeRO-{zero}'}, {run.get('world_size')} ranks on "
        f"{run.get('nodes')} node(s) ({', '.join(env.get('hosts', []))}), {batch}, "
        f"sequence length {run.get('max_seq_len')}, packing {run.get('packing')}"
        + (f", sequence parallel {run['sequence_parallel']}" if (run.get("sequence_parallel") or 1) > 1 else ""),
        f"  device {lookup(report, 'per_rank.0.device_name')}, torch {env.get('torch')}, deepspeed "
        f"{env.get('deepspeed')}, transformers {env.get('transformers')}, CUDA {env.get('cuda') or DASH}",
        f"  steps {steps['first']}..{steps['last']}: {steps['measured']} measured after {steps['warmup_excluded']} "
        "warm-up",
        "",
        f"  {'(ms)':<12}" + "".join(f"{k:>10}" for k in STAT_KEYS[1:]),
    ]
    series = [("step", report["step_ms"]), *report["phases_ms"].items()]
    for name, stats in series:
        if stats is None:
            lines.append(f"  {name:<12}" + f"{DASH:>10}" * (len(STAT_KEYS) - 1))
        else:
            lines.append(f"  {name:<12}" + "".join(f"{stats[k]:>10.2f}" for k in STAT_KEYS[1:]))
    coverage = report["phase_coverage"]
    lines.append(f"  phases cover {_num(coverage and 100 * coverage, '%', 3)} of step time")
    t = report["throughput"] or {}
    lines += [
        "",
        f"  throughput: {_num(t.get('samples_per_s'))} samples/s, {_num(t.get('tokens_per_s'))} tokens/s "
        f"({_num(t.get('tokens_per_s_per_device'))} per device), {_num(t.get('images_per_s'))} images/s; "
        f"padding efficiency {_num(report['padding_efficiency'] and 100 * report['padding_efficiency'], '%', 3)}",
    ]
    m = report["memory"]
    lines.append(f"  memory: GPU peak allocated {_num(m.get('gpu_peak_allocated_gib'), ' GiB')}, reserved "
                 f"{_num(m.get('gpu_peak_reserved_gib'), ' GiB')}, host peak RSS {_num(m.get('host_peak_rss_gib'), ' GiB')}")
    lines += _plan_lines(run.get("plan"))
    f = report["flops"]
    mfu = f.get("mfu")
    lines.append(f"  FLOPs: {_num(f.get('achieved_tflops_per_device'))} TFLOP/s per device; MFU "
                 f"{_num(mfu and 100 * mfu, '%', 3)} (peak: {f.get('peak_source')})")
    slow = report["slowest_rank"]
    if run.get("world_size", 1) > 1:
        lines.append(f"  slowest rank {slow['rank']} on {slow['host']} ({_num(slow['step_ms_mean'], ' ms')} "
                     f"per step; fastest rank {slow['fastest_rank']}: {_num(slow['fastest_step_ms_mean'], ' ms')})")
    wall = report["wall_s"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in wall.items() if isinstance(v, int | float))
    lines.append(f"  wall (s): {parts}; epochs: " + (", ".join(
        f"{e['epoch']}: {e['steps']} steps {e['wall_s']:.1f} s" for e in wall.get("epochs", [])) or DASH))
    prepared = report.get("prepared_media")
    if prepared is not None:
        lines.append(f"  prepared media: {prepared['videos_unprepared']} videos decoded because the store lacked them")
    lines += _evaluation_lines(report.get("evaluation"))
    cache = report.get("vision_cache")
    if cache is not None:
        rate = DASH if cache["hit_rate"] is None else f"{cache['hit_rate']:.0%}"
        lines.append(f"  vision cache: {cache['samples_cached']} samples cached, {cache['samples_computed']} computed "
                     f"(hit rate {rate}), {cache['bytes_read'] / 2**20:.1f} MiB read")
    return "\n".join(lines)


def _plan_lines(plan: Mapping[str, Any] | None) -> list[str]:
    if not plan:
        return []
    error = plan.get("error_pct")
    return [f"  planned: peak allocated {_num(plan.get('peak_allocated_gib'), ' GiB')} per rank "
            f"(at {plan.get('peak_moment')}; hpc-train plan), measured in training "
            f"{_num(plan.get('measured_peak_allocated_gib'), ' GiB')}, error "
            f"{DASH if error is None else f'{error:+.1f}%'}"]


def _evaluation_lines(evaluation: Mapping[str, Any] | None) -> list[str]:
    if not evaluation:
        return []
    scores = ", ".join(f"{name} {value:.3f}" for name, value in (evaluation.get("metrics") or {}).items())
    lines = [f"  evaluation: loss {_num(evaluation.get('loss'))}, perplexity {_num(evaluation.get('perplexity'))}"
             + (f"; {scores}" if scores else "")]
    made = evaluation.get("generation")
    if made:
        lines.append(f"  generation: {made['records']} answers, {made['new_tokens']} new tokens in "
                     f"{made['seconds']:.1f} s ({_num(made['tokens_per_s'])} tokens/s, "
                     f"{_num(made['records_per_s'])} answers/s)")
    return lines
