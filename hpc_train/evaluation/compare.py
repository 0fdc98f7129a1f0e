"""``hpc-train compare-eval``: a baseline's evaluation and fine-tuned ones side by side.

Every later file is paired with the first (the baseline) by record id, and each metric, over all
records and per record kind, is recomputed on the paired records from the per-record rows
(:func:`~hpc_train.evaluation.metrics.summarize`), so both sides are measured on exactly the
same questions. The difference gets a paired bootstrap interval (:mod:`.bootstrap`), and the
verdict says whether it is larger than what resampling the same records would give by chance.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_train.errors import ConfigError, DataError, HpcTrainError
from hpc_train.evaluation import CONFIDENCE, METRICS, RESAMPLES

if TYPE_CHECKING:
    from hpc_train.evaluation.bootstrap import Difference

RESULTS_FILE = "eval_results.json"
ALL = "all"
"""The kind label of the rows over every paired record."""
HELP = ("baseline vs fine-tuned evaluations side by side: every metric per kind, the difference "
        "with a paired bootstrap 95% interval")
_RERUN = f"re-run `hpc-train eval` for that run to write {RESULTS_FILE} again"
MIN_RECORDS = 10
"""Fewer paired records than this get no verdict: a draw of 1-9 records has too few distinct
samples for a percentile interval to mean anything (one record: zero width)."""


@dataclass(frozen=True)
class Evaluation:
    """One eval_results.json: its per-record rows and the metrics it computed."""

    label: str
    path: Path
    metrics: tuple[str, ...]
    records: list[dict[str, Any]]
    about: dict[str, Any] = field(default_factory=dict)
    """``mode``, ``model``, ``data`` and ``step`` as the file has them."""


@dataclass(frozen=True)
class Line:
    """One metric over one kind (or ``all``): both values and their difference."""

    metric: str
    kind: str
    records: int
    baseline: float
    other: float
    difference: Difference

    @property
    def verdict(self) -> str:
        return "too few records" if self.records < MIN_RECORDS else self.difference.verdict

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "kind": self.kind, "records": self.records,
                "baseline": self.baseline, "other": self.other, **self.difference.to_dict(),
                "verdict": self.verdict}


@dataclass(frozen=True)
class Comparison:
    """A later evaluation against the baseline, on the records both have."""

    baseline: Evaluation
    other: Evaluation
    paired: int
    left_out: tuple[int, int]
    """Records of the baseline, and of the other file, whose id the other file lacks."""
    metrics: tuple[str, ...]
    skipped: dict[str, str]
    """Metric -> why it is not compared (only one file computed it)."""
    kinds: tuple[str, ...]
    lines: tuple[Line, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**_describe(self.other), "paired_records": self.paired,
                "left_out": {"baseline": self.left_out[0], "other": self.left_out[1]},
                "metrics": list(self.metrics), "skipped_metrics": self.skipped, "kinds": list(self.kinds),
                "rows": [line.to_dict() for line in self.lines], "notes": list(self.notes)}


def results_file(path: str | Path) -> Path:
    """The eval_results.json a path names: the file itself, or the one in a run folder."""
    given = Path(path)
    return given / RESULTS_FILE if given.is_dir() else given


def load_evaluation(path: str | Path, label: str | None = None) -> Evaluation:
    """An evaluation read and checked up front, so a bad file fails here with its name and a fix
    rather than as a KeyError halfway through the bootstrap."""
    file = results_file(path)
    if not file.is_file():
        raise DataError("no evaluation results here", path=file,
                        fix=f"pass an {RESULTS_FILE}, or the output_dir of a run that evaluated")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not readable as JSON ({exc})", path=file, fix=_RERUN) from exc
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise DataError('no per-record "records" (written by an older hpc-train, which kept only the '
                        "totals)", path=file, fix=_RERUN)
    if not data["records"]:
        raise DataError("no generated answers were scored (its records are empty)", path=file,
                        fix="evaluate with eval.generate=true on a non-empty data.eval")
    computed = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
    metrics = tuple(m for m in METRICS if m in computed)
    seen: set[str] = set()
    for row in data["records"]:
        _check_record(file, row, metrics, seen)
    about = {k: data.get(k) for k in ("mode", "model", "data", "step")}
    return Evaluation(label or file.resolve().parent.name or file.stem, file, metrics, data["records"], about)


def _check_record(file: Path, row: Any, metrics: Sequence[str], seen: set[str]) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("id"), str | int):
        raise DataError(f"a record without an id: {str(row)[:80]}", path=file, fix=_RERUN)
    rid = str(row["id"])
    if rid in seen:
        raise DataError("the id appears twice, so records cannot be paired by id", path=file,
                        record_id=rid, fix="give every record of data.eval its own id and evaluate again")
    seen.add(rid)
    scores = row.get("scores") if isinstance(row.get("scores"), dict) else {}
    missing = [m for m in metrics if (m == "bleu4" and len(row.get("bleu") or ()) != 10)
               or (m != "bleu4" and m not in scores)]
    if missing or "kind" not in row:
        raise DataError(f"the record lacks {', '.join(missing) or 'kind'}", path=file, record_id=rid, fix=_RERUN)


def compare(baseline: Evaluation, other: Evaluation, *, resamples: int = RESAMPLES,
            seed: int = 0) -> Comparison:
    """``other`` against ``baseline`` on the record ids both have, every shared metric per kind."""
    from hpc_train.evaluation.bootstrap import paired_bootstrap
    from hpc_train.evaluation.metrics import values_over

    by_id = {str(r["id"]): r for r in other.records}
    mine = [r for r in baseline.records if str(r["id"]) in by_id]
    theirs = [by_id[str(r["id"])] for r in mine]
    if not mine:
        raise DataError(f"no record id in common with the baseline {baseline.path}", path=other.path,
                        fix="compare evaluations of the same data.eval (ids such as "
                            f"{baseline.records[0]['id']!r} vs {other.records[0]['id']!r})")
    for a, b in zip(mine, theirs, strict=True):
        if a["kind"] != b["kind"]:
            raise DataError(f"the record is {b['kind']!r} here but {a['kind']!r} in {baseline.path}",
                            path=other.path, record_id=str(a["id"]), fix="compare evaluations of the same data.eval")
    left_out = (len(baseline.records) - len(mine), len(other.records) - len(mine))
    if any(left_out):  # CIDEr's IDF was each whole file's: both sides again, over the paired set
        mine, theirs = _cider_again(mine), _cider_again(theirs)
    metrics = tuple(m for m in METRICS if m in baseline.metrics and m in other.metrics)
    skipped = {m: f"only in {baseline.label if m in baseline.metrics else other.label}"
               for m in METRICS if (m in baseline.metrics) != (m in other.metrics)}
    if not metrics:
        raise DataError(f"no metric in common with the baseline {baseline.path}", path=other.path,
                        fix="evaluate both with the same eval.metrics")
    kinds = tuple(dict.fromkeys(r["kind"] for r in mine))
    lines = []
    for kind in (ALL, *kinds):
        a = mine if kind == ALL else [r for r in mine if r["kind"] == kind]
        b = theirs if kind == ALL else [r for r in theirs if r["kind"] == kind]
        values_a, values_b = values_over(a, metrics), values_over(b, metrics)
        for metric, diff in paired_bootstrap(a, b, metrics, resamples=resamples, seed=seed).items():
            lines.append(Line(metric, kind, len(a), values_a[metric], values_b[metric], diff))
    lines.sort(key=lambda line: metrics.index(line.metric))  # stable: kinds stay in order
    notes = _notes(baseline, other, len(mine), left_out, skipped)
    differing = sum(list(a["references"]) != list(b["references"]) for a, b in zip(mine, theirs, strict=True))
    if differing:
        notes.append(f"{differing} paired records have other references in {other.label} than in {baseline.label}: "
                     "are both evaluations of the same data.eval?")
    if any(line.records < MIN_RECORDS for line in lines):
        notes.append(f"a kind with fewer than {MIN_RECORDS} paired records gets no verdict")
    return Comparison(baseline, other, len(mine), left_out, metrics, skipped, kinds, tuple(lines), tuple(notes))


def _cider_again(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` with CIDEr scored over these rows' references only (when they have it)."""
    from hpc_train.evaluation.metrics import score_rows

    copies = [{**r, "scores": dict(r.get("scores") or {})} for r in rows]
    if all("cider" in r["scores"] for r in copies):
        score_rows(copies, ["cider"])
    return copies


def _notes(baseline: Evaluation, other: Evaluation, paired: int, left_out: tuple[int, int],
           skipped: dict[str, str]) -> list[str]:
    notes = []
    if any(left_out):
        notes.append(f"{left_out[0]} of {baseline.label}'s {len(baseline.records)} records and {left_out[1]} of "
                     f"{other.label}'s {len(other.records)} have no counterpart and are left out; values (CIDEr's "
                     f"IDF too) are recomputed on the {paired} paired records, so they may differ from each file's own")
    for metric, why in skipped.items():
        notes.append(f"{metric} not compared: {why}")
    if baseline.about.get("data") != other.about.get("data"):
        notes.append(f"data differs: {baseline.label}={baseline.about.get('data')}, "
                     f"{other.label}={other.about.get('data')}")
    return notes


def compare_files(paths: Sequence[str | Path], labels: Sequence[str] | None = None, *,
                  resamples: int = RESAMPLES, seed: int = 0) -> list[Comparison]:
    """Every file after the first compared with the first (the baseline)."""
    if len(paths) < 2:
        shown = paths[0] if paths else "nothing"
        raise ConfigError(f"compare-eval needs a baseline and at least one other evaluation, got only {shown}. "
                          f"Fix: pass the baseline's {RESULTS_FILE} (or run folder) first, then the "
                          "fine-tuned run's")
    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f"--labels names {len(labels)} evaluations but {len(paths)} were given. "
                          "Fix: one comma-separated label per file, in the same order")
    evaluations = _unique([load_evaluation(p, labels[i] if labels else None) for i, p in enumerate(paths)])
    return [compare(evaluations[0], e, resamples=resamples, seed=seed) for e in evaluations[1:]]


def _unique(evaluations: list[Evaluation]) -> list[Evaluation]:
    """Labels made distinct (two runs' files are often both in a folder named ``run``)."""
    counts: dict[str, int] = {}
    out = []
    for e in evaluations:
        counts[e.label] = counts.get(e.label, 0) + 1
        label = e.label if counts[e.label] == 1 else f"{e.label}#{counts[e.label]}"
        out.append(Evaluation(label, e.path, e.metrics, e.records, e.about))
    return out


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def format_table(comparisons: Sequence[Comparison], *, markdown: bool = False) -> str:
    """One table per compared file: metric, kind, records, both values, difference, interval,
    verdict; then its notes."""
    blocks = []
    for c in comparisons:
        base, other = c.baseline.label, c.other.label
        draws = c.lines[0].difference.draws
        title = (f"{other} compared with {base} (the first file): {c.paired} paired records, {draws} paired bootstrap "
                 f"draws, {CONFIDENCE:.0%} intervals")
        header = ["metric", "kind", "records", base, other, "difference", f"{CONFIDENCE:.0%} interval", "verdict"]
        rows = [[line.metric, line.kind, str(line.records), f"{line.baseline:.3f}", f"{line.other:.3f}",
                 _signed(line.difference.value),
                 f"[{_signed(line.difference.low)}, {_signed(line.difference.high)}]", line.verdict]
                for line in c.lines]
        if markdown:
            table = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                     *("| " + " | ".join(cells) + " |" for cells in rows)]
            blocks.append("\n".join([f"**{title}**", "", *table, *([""] if c.notes else []), *(f"- {n}" for n in c.notes)]))
            continue
        widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
        table = ["  ".join(cell.rjust(w) if 2 <= i <= 5 else cell.ljust(w)
                           for i, (cell, w) in enumerate(zip(cells, widths, strict=True))).rstrip()
                 for cells in [header, *rows]]
        blocks.append("\n".join([title, *table, *(f"note: {n}" for n in c.notes)]))
    return "\n\n".join(blocks)


def _describe(evaluation: Evaluation) -> dict[str, Any]:
    return {"label": evaluation.label, "path": str(evaluation.path), **evaluation.about,
            "records": len(evaluation.records)}


def to_json(comparisons: Sequence[Comparison], *, resamples: int, seed: int) -> dict[str, Any]:
    """The whole comparison as plain data (the ``--json`` file)."""
    return {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE,
            "baseline": _describe(comparisons[0].baseline),
            "comparisons": [c.to_dict() for c in comparisons]}


def plot(comparisons: Sequence[Comparison], out: str | Path) -> Path:
    """A PNG with one column per metric: each file's value per kind (top) and each difference
    from the baseline with its interval as error bars (bottom). The baseline's bars are those of
    the first comparison's paired records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpc_train.evaluation.bootstrap import Difference

    metrics = [m for m in METRICS if any(m in c.metrics for c in comparisons)]
    groups = list(dict.fromkeys(g for c in comparisons for g in (ALL, *c.kinds)))
    fig, axes = plt.subplots(2, len(metrics), figsize=(4.2 * len(metrics), 7), squeeze=False)
    width = 0.8 / (len(comparisons) + 1)
    for col, metric in enumerate(metrics):
        top, bottom = axes[0][col], axes[1][col]
        found = {(c.other.label, line.kind): line for c in comparisons for line in c.lines if line.metric == metric}
        series = [(comparisons[0].baseline.label, comparisons[0].other.label, "baseline")]
        series += [(c.other.label, c.other.label, "other") for c in comparisons]
        for i, (label, key, side) in enumerate(series):
            heights = [getattr(found[(key, g)], side) if (key, g) in found else float("nan") for g in groups]
            top.bar([k - 0.4 + width * (i + 0.5) for k in range(len(groups))], heights, width, label=label)
        spread = 0.8 / len(comparisons)
        for i, c in enumerate(comparisons):
            lines = [found.get((c.other.label, g)) for g in groups]
            x = [k - 0.4 + spread * (i + 0.5) for k in range(len(groups))]
            diffs = [line.difference if line else Difference(float("nan"), 0.0, 0.0, 0) for line in lines]
            # the same colour as the file's bars above, so one legend serves both rows
            bottom.bar(x, [d.value for d in diffs], spread, color=f"C{i + 1}",
                       yerr=[[d.value - d.low for d in diffs], [d.high - d.value for d in diffs]], capsize=3)
        bottom.axhline(0.0, color="black", linewidth=0.8)
        top.set(title=metric)
        bottom.set(title=f"{metric}: minus {comparisons[0].baseline.label}, {CONFIDENCE:.0%} interval")
        for ax in (top, bottom):
            ax.set_xticks(range(len(groups)), groups)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncols=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``compare-eval`` to a subparsers object (``hpc-train``'s, or :func:`main`'s)."""
    p = sub.add_parser("compare-eval", help=HELP, description=HELP)
    p.add_argument("results", nargs="+", help=f"{RESULTS_FILE} files, or run folders holding one; "
                                              "the first is the baseline every other is compared with")
    p.add_argument("--labels", default=None, help="comma-separated names, one per file "
                                                  "(default: each file's folder name)")
    p.add_argument("--resamples", type=_positive, default=RESAMPLES, help="paired bootstrap draws")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (same seed, same report)")
    p.add_argument("--plot", default=None, help="also draw the comparison into this PNG")
    p.add_argument("--json", default=None, help="also write the whole comparison as JSON to this file")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The command: the table on stdout, the JSON and the plot where asked."""
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    comparisons = compare_files(args.results, labels, resamples=args.resamples, seed=args.seed)
    print(format_table(comparisons, markdown=args.markdown))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_json(comparisons, resamples=args.resamples, seed=args.seed), indent=2))
        print(f"comparison written to {path}")
    if args.plot:
        print(f"plot written to {plot(comparisons, args.plot)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``compare-eval`` on its own (tests, ``python -m hpc_train.evaluation.compare``): errors the
    user can fix are printed, exit status 2, as ``hpc-train`` does."""
    parser = argparse.ArgumentParser(prog="hpc-train")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare-eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except HpcTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


__all__ = ["ALL", "HELP", "RESULTS_FILE", "Comparison", "Evaluation", "Line", "compare", "compare_files",
           "format_table", "load_evaluation", "main", "plot", "register", "results_file", "run", "to_json"]


if __name__ == "__main__":
    sys.exit(main())

