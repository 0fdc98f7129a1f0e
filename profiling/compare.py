"""Reports side by side: a table with ratios against the first report, and a bar chart.

A figure a report does not have (an evaluation-only baseline has no backward or optimizer
phase, a CPU run no GPU memory) is shown as "—" and its ratio left out, never as 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiling.timers import PHASES

DASH = "—"


@dataclass(frozen=True)
class Row:
    label: str
    path: str
    """Dotted path into the report."""
    kind: str = "number"
    """``number`` (with a ratio), ``percent`` (with a ratio) or ``text`` (no ratio)."""


ROWS: tuple[Row, ...] = (
    Row("workload", "workload", "text"),
    Row("mode", "run.mode", "text"),
    Row("model", "run.model", "text"),
    Row("ZeRO stage", "run.zero_stage", "text"),
    Row("ranks x nodes", "", "text"),
    Row("device", "per_rank.0.device_name", "text"),
    Row("step mean (ms)", "step_ms.mean"),
    Row("step median (ms)", "step_ms.median"),
    Row("step p95 (ms)", "step_ms.p95"),
    *(Row(f"{p} mean (ms)", f"phases_ms.{p}.mean") for p in PHASES),
    Row("samples/s", "throughput.samples_per_s"),
    Row("tokens/s", "throughput.tokens_per_s"),
    Row("tokens/s per device", "throughput.tokens_per_s_per_device"),
    Row("padding efficiency", "padding_efficiency", "percent"),
    Row("GPU peak allocated (GiB)", "memory.gpu_peak_allocated_gib"),
    Row("GPU peak reserved (GiB)", "memory.gpu_peak_reserved_gib"),
    Row("GPU peak allocated, training (GiB)", "memory.gpu_train_peak_allocated_gib"),
    Row("GPU peak allocated, evaluation (GiB)", "memory.gpu_eval_peak_allocated_gib"),
    Row("GPU peak allocated, export (GiB)", "memory.gpu_export_peak_allocated_gib"),
    Row("host peak RSS (GiB)", "memory.host_peak_rss_gib"),
    Row("planned peak allocated (GiB)", "run.plan.peak_allocated_gib"),
    Row("plan error vs measured (%)", "run.plan.error_pct", "text"),
    Row("TFLOP/s per device", "flops.achieved_tflops_per_device"),
    Row("MFU", "flops.mfu", "percent"),
    Row("wall total (s)", "wall_s.total"),
)


def lookup(report: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path (list items by index), or ``None`` when it is absent."""
    if path == "":
        run = report.get("run", {})
        return f"{run.get('world_size', '?')} x {run.get('nodes', '?')}"
    value: Any = report
    for part in path.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
        if value is None:
            return None
    return value


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return DASH
    if kind == "percent":
        return f"{100 * value:.1f}%"
    if kind == "text":
        return str(value)
    magnitude = abs(value)
    return f"{value:.3g}" if magnitude < 100 else f"{value:,.0f}"


def labels_for(reports: Sequence[Mapping[str, Any]], paths: Sequence[str]) -> list[str]:
    """Column names: the run modes when they tell the reports apart, else the file paths."""
    modes = [str(lookup(r, "run.mode") or "?") for r in reports]
    return modes if len(set(modes)) == len(modes) else [str(p) for p in paths]


def compare_table(reports: Sequence[Mapping[str, Any]], labels: Sequence[str], *,
                  markdown: bool = False) -> str:
    """The side-by-side table, with ``label/first`` ratio columns for the second report on."""
    first = labels[0]
    header = ["metric", labels[0]]
    for label in labels[1:]:
        header += [label, f"{label}/{first}"]
    rows = []
    for row in ROWS:
        values = [lookup(r, row.path) for r in reports]
        cells = [row.label, _fmt(values[0], row.kind)]
        for value in values[1:]:
            cells.append(_fmt(value, row.kind))
            cells.append(_ratio(values[0], value) if row.kind != "text" else "")
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(cells, widths, strict=True))).rstrip()
                     for cells in [header, *rows])


def _ratio(base: Any, value: Any) -> str:
    if not isinstance(base, int | float) or not isinstance(value, int | float) or base == 0:
        return DASH
    return f"{value / base:.2f}x"


def differences(reports: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    """Notes on what differs besides what is compared (hardware, model, sequence length)."""
    notes = []
    for path, what in (("environment.gpu_name", "GPU"), ("run.model", "model"), ("run.max_seq_len", "sequence length"),
                       ("run.world_size", "world size"), ("environment.torch", "torch version")):
        values = [lookup(r, path) for r in reports]
        if len({str(v) for v in values}) > 1:
            notes.append(f"note: {what} differs: " + ", ".join(f"{lab}={v}" for lab, v in zip(labels, values,
                                                                                              strict=True)))
    return notes


def plot(reports: Sequence[Mapping[str, Any]], labels: Sequence[str], out: str | Path) -> Path:
    """A PNG with phase times (stacked), throughput and peak memory per report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    x = range(len(reports))
    bottom = [0.0] * len(reports)
    for phase in PHASES:
        heights = [lookup(r, f"phases_ms.{phase}.mean") or 0.0 for r in reports]
        axes[0].bar(x, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    other = [max(0.0, (lookup(r, "step_ms.mean") or 0.0) - b) for r, b in zip(reports, bottom, strict=True)]
    axes[0].bar(x, other, bottom=bottom, label="other", color="lightgrey")
    axes[0].set(title="step time (mean, ms)", ylabel="ms")
    axes[0].legend(fontsize="small")
    tokens = [lookup(r, "throughput.tokens_per_s") for r in reports]
    bars = axes[1].bar(x, [t or 0.0 for t in tokens], color="tab:blue")
    for bar, r, t in zip(bars, reports, tokens, strict=True):
        samples = lookup(r, "throughput.samples_per_s")
        text = DASH if t is None else f"{_fmt(samples, 'number')} samples/s"
        axes[1].annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                         fontsize="small")
    axes[1].set(title="throughput (real tokens/s, all ranks)", ylabel="tokens/s")
    memory = [(name, path) for name, path in (
        ("GPU allocated", "memory.gpu_peak_allocated_gib"), ("GPU reserved", "memory.gpu_peak_reserved_gib"),
        ("host RSS", "memory.host_peak_rss_gib")) if any(lookup(r, path) is not None for r in reports)]
    _grouped(axes[2], reports, "peak memory per rank (GiB)", memory)
    for ax in axes:
        ax.set_xticks(list(x), labels, rotation=15)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _grouped(ax: Any, reports: Sequence[Mapping[str, Any]], title: str, series: Sequence[tuple[str, str]]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, path) in enumerate(series):
        values = [lookup(r, path) for r in reports]
        positions = [k - 0.4 + width * (i + 0.5) for k in range(len(reports))]
        ax.bar(positions, [v if v is not None else 0.0 for v in values], width, label=name)
        for position, v in zip(positions, values, strict=True):
            if v is None:  # absent, not zero: say so on the chart
                ax.text(position, 0, DASH, ha="center", va="bottom")
    ax.set(title=title)
    if series:
        ax.legend(fontsize="small")
