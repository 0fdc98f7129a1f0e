"""``hpc-train check-data``: audit a dataset exactly as training would build it.

Every record goes through the same reader, media loader and chat encoder as in training;
nothing is skipped silently, every problem is listed with its file and line.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from hpc_train.config import RunConfig
from hpc_train.data.batching.frame_counts import FrameCounts
from hpc_train.data.dataset import MediaLoader
from hpc_train.data.encoding.tokenize import IGNORE_INDEX, ChatEncoder, EncodedSample
from hpc_train.data.pipeline import DataPipeline, build_pipeline
from hpc_train.data.sources.mixture import read_split
from hpc_train.data.sources.records import Record
from hpc_train.errors import ConfigError, DataError
from hpc_train.models.load import load_processor, model_family
from profiling.stats import summarize

SUPERVISED_OPEN, SUPERVISED_CLOSE = "[[", "]]"


@dataclass
class AuditReport:
    """What ``check-data`` found; ``ok`` is False when any record is unusable, or when a sample
    is over ``max_seq_len`` and ``truncation`` is ``error``."""

    split: str
    path: str
    max_seq_len: int
    truncation: str = "drop"
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
        too_long_stops = self.truncation == "error" and bool(self.over_max_seq_len)
        return not self.errors and self.usable > 0 and not too_long_stops

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def audit_dataset(config: RunConfig, *, split: str = "train", limit: int | None = None,
                  progress: bool = True, pipeline: DataPipeline | None = None) -> AuditReport:
    """Read, decode and tokenize every record of ``split`` (or the first ``limit``); ``pipeline``:
    one already built for this config's model (auditing many files with one processor)."""
    path = getattr(config.data, split)
    if path is None:
        raise ConfigError(f"data.{split} is not set. Fix: pass data.{split}=PATH")
    started = time.perf_counter()
    records = read_split(config, split)
    if pipeline is None:
        pipeline = build_pipeline(config.data, load_processor(config.model), model_family(config.model))
    audit = _Audit(config, records, pipeline.encoder, pipeline.media,
                   AuditReport(split=split, path=str(path), max_seq_len=config.data.max_seq_len,
                               truncation=config.data.truncation))
    total = len(records) if limit is None else min(limit, len(records))
    for i in range(total):
        audit.check(i)
        if progress and (i + 1) % 100 == 0:
            print(f"  checked {i + 1}/{total} records", file=sys.stderr, flush=True)
    report = audit.finish(packing=config.data.packing and split == "train",
                          batch_size=config.train.micro_batch_size if split == "train" else config.eval.batch_size)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


class _Audit:
    """One pass over a split: each record checked on its own, the split's totals kept."""

    def __init__(self, config: RunConfig, records: Sequence[Record], encoder: ChatEncoder, media: MediaLoader,
                 report: AuditReport) -> None:
        self.config, self.records, self.encoder, self.media, self.report = config, records, encoder, media, report
        self.measures: dict[str, list[int]] = {"total": [], "media": [], "text": [], "supervised": []}
        self.kinds: Counter[str] = Counter()
        self.example: EncodedSample | None = None
        self.first_line: dict[tuple[Path, str], int] = {}
        self.frames = FrameCounts()

    def check(self, i: int) -> None:
        report = self.report
        report.records += 1
        try:
            record = self.records[i]
            loaded = self.media.load(record)
            sample = self.encoder.encode(record, loaded)
        except DataError as exc:
            report.errors.append(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - one record must never end the audit of the others
            report.errors.append(self._unexpected(i, exc))
            return
        if self._duplicate(record):
            return
        self.kinds[record.kind] += 1
        limit = self.config.data.max_seq_len
        if len(sample) > limit:
            report.over_max_seq_len.append(
                f"{record.where}: {len(sample)} tokens ({sample.num_media_tokens} from media), over "
                f"data.max_seq_len={limit}. Fix: raise data.max_seq_len to {len(sample)}, use fewer frames "
                "(data.video.num_frames / max_frames) or smaller images (data.image.max_side), or shorten the "
                f"conversation; data.truncation={self.config.data.truncation} "
                + ("leaves it out of training" if self.config.data.truncation == "drop" else "stops training at it"))
            return
        report.usable += 1
        self.frames.add(i, [len(v.frames) for v in loaded.videos])
        self.measures["total"].append(len(sample))
        self.measures["media"].append(sample.num_media_tokens)
        self.measures["text"].append(sample.num_text_tokens)
        self.measures["supervised"].append(sample.num_supervised)
        if self.example is None or (not self.example.num_media_tokens and sample.num_media_tokens):
            self.example = sample

    def _duplicate(self, record: Record) -> bool:
        key = (record.source, record.id)
        first = self.first_line.setdefault(key, record.line)
        if first == record.line:  # a mixture may repeat the very same record
            return False
        self.report.errors.append(str(DataError(
            f"duplicate id (first used by the record at line {first})", path=record.source, line=record.line,
            record_id=record.id, fix="give every record a unique id (or drop the ids for <file>:<line>)")))
        return True

    def _unexpected(self, i: int, exc: Exception) -> str:
        try:
            source, line = self.records.location(i)  # type: ignore[attr-defined]
            where = f"{source}:{line}"
        except Exception:  # noqa: BLE001 - the message must still be written
            where = f"record {i}"
        text = str(exc)
        text = text if len(text) <= 300 else text[:300] + "..."
        return (f"{where}: unexpected {type(exc).__name__}: {text}. Fix: this record found a bug in hpc-train; "
                "please report it with the record")

    def finish(self, *, packing: bool, batch_size: int) -> AuditReport:
        report = self.report
        if not self.encoder.family.video_as_images:
            error = self.frames.mixing_error(lambda i: self.records[i].where, path=report.path, packing=packing,
                                             batch_size=batch_size)
            if error is not None:
                report.errors.append(str(error))
        report.kinds = dict(sorted(self.kinds.items()))
        report.tokens = {name: _stats(values) for name, values in self.measures.items() if values}
        if self.example is not None:
            report.example = render_sample(self.encoder, self.example)
        return report


def render_sample(encoder: ChatEncoder, sample: EncodedSample) -> str:
    """Decode a sample with supervised runs in [[...]] and runs of one media token collapsed."""
    tokenizer = encoder.tokenizer
    ids = sample.input_ids.tolist()
    supervised = (sample.labels != IGNORE_INDEX).tolist()
    family = encoder.family
    media_ids = {tokenizer.convert_tokens_to_ids(t) for t in (family.image_token, family.video_token) if t} - {None}

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
