"""``hpc-train check-data``: audit a dataset exactly as training would build it.

Every record goes through the same reader, media loader and chat encoder as in training;
nothing is skipped silently, every problem is listed with its file and line.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import Any

from hpc_train.config import RunConfig
from hpc_train.data.dataset import MediaLoader
from hpc_train.data.mixture import read_split
from hpc_train.data.tokenize import IGNORE_INDEX, ChatEncoder, EncodedSample
from hpc_train.errors import ConfigError, DataError
from hpc_train.models.load import load_processor, model_family
from profiling.stats import summarize

SUPERVISED_OPEN, SUPERVISED_CLOSE = "[[", "]]"


@dataclass
class AuditReport:
    """What ``check-data`` found; ``ok`` is False when any record is unusable."""

    split: str
    path: str
    max_seq_len: int
    records: int = 0
    usable: int = 0
    errors: list[str] = field(default_factory=list)
    over_max_seq_len: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per measure (total, media, text, supervised): min, median, p95, max, mean."""
    example: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and self.records > 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def audit_dataset(config: RunConfig, *, split: str = "train", limit: int | None = None,
                  progress: bool = True) -> AuditReport:
    """Read, decode and tokenize every record of ``split`` (or the first ``limit``)."""
    path = getattr(config.data, split)
    if path is None:
        raise ConfigError(f"data.{split} is not set. Fix: pass data.{split}=PATH")
    started = time.perf_counter()
    records = read_split(config, split)
    family = model_family(config.model)
    encoder = ChatEncoder(load_processor(config.model), family, system_prompt=config.data.system_prompt)
    media = MediaLoader(config.data)
    report = AuditReport(split=split, path=str(path), max_seq_len=config.data.max_seq_len)
    total = len(records) if limit is None else min(limit, len(records))
    measures: dict[str, list[int]] = {"total": [], "media": [], "text": [], "supervised": []}
    kinds: Counter[str] = Counter()
    example: EncodedSample | None = None
    for i in range(total):
        report.records += 1
        try:
            record = records[i]
            sample = encoder.encode(record, media.load(record))
        except DataError as exc:
            report.errors.append(str(exc))
            continue
        kinds[record.kind] += 1
        if len(sample) > config.data.max_seq_len:
            report.over_max_seq_len.append(
                f"{record.source}:{record.line} [id {record.id}]: {len(sample)} tokens")
        report.usable += 1
        measures["total"].append(len(sample))
        measures["media"].append(sample.num_media_tokens)
        measures["text"].append(sample.num_text_tokens)
        measures["supervised"].append(sample.num_supervised)
        if example is None or (not example.num_media_tokens and sample.num_media_tokens):
            example = sample
        if progress and (i + 1) % 100 == 0:
            print(f"  checked {i + 1}/{total} records", file=sys.stderr, flush=True)
    report.kinds = dict(sorted(kinds.items()))
    report.tokens = {name: _stats(values) for name, values in measures.items() if values}
    if example is not None:
        report.example = render_sample(encoder, example)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def render_sample(encoder: ChatEncoder, sample: EncodedSample) -> str:
    """Decode a sample with supervised runs in [[...]] and runs of one media token collapsed."""
    tokenizer = encoder.tokenizer
    ids = sample.input_ids.tolist()
    supervised = (sample.labels != IGNORE_INDEX).tolist()
    media_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>")} - {None}

    def run_key(k: int) -> tuple[bool, int | None]:
        return supervised[k], ids[k] if ids[k] in media_ids else None

    out: list[str] = []
    for (is_supervised, media_id), group in groupby(range(len(ids)), key=run_key):
        run = [ids[k] for k in group]
        if media_id is not None and len(run) > 1:
            text = f"{tokenizer.convert_ids_to_tokens(media_id)}×{len(run)}"
        else:
            text = tokenizer.decode(run, skip_special_tokens=False)
        out.append(f"{SUPERVISED_OPEN}{text}{SUPERVISED_CLOSE}" if is_supervised else text)
    return "".join(out)


def format_report(report: AuditReport, *, max_errors: int = 20) -> str:
    """A human-readable summary of an audit."""
    lines = [f"check-data: {report.split} set {report.path}",
             f"  records: {report.records}   usable: {report.usable}   "
             f"with errors: {len(report.errors)}   over max_seq_len={report.max_seq_len}: "
             f"{len(report.over_max_seq_len)}"]
    if report.kinds:
        lines.append("  kinds: " + ", ".join(f"{k} {v}" for k, v in report.kinds.items()))
    if report.tokens:
        lines.append("  tokens per sample      min  median     p95     max    mean")
        for name, s in report.tokens.items():
            lines.append(f"    {name:<18}{s['min']:>6.0f}{s['median']:>8.1f}{s['p95']:>8.1f}"
                         f"{s['max']:>8.0f}{s['mean']:>8.1f}")
    for title, items in (("errors", report.errors), ("over max_seq_len", report.over_max_seq_len)):
        if items:
            lines.append(f"  {title}:")
            lines += [f"    {e}" for e in items[:max_errors]]
            if len(items) > max_errors:
                lines.append(f"    ... and {len(items) - max_errors} more")
    if report.example:
        lines.append(f"  example sample (supervised tokens in {SUPERVISED_OPEN}...{SUPERVISED_CLOSE}):")
        lines += [f"    {line}" for line in report.example.splitlines()]
    lines.append(f"  {'OK' if report.ok else 'FAILED'} in {report.seconds:.1f} s")
    return "\n".join(lines)


def _stats(values: list[int]) -> dict[str, float]:
    stats = summarize(values)
    return {k: round(stats[k], 2) for k in ("min", "median", "p95", "max", "mean")}
