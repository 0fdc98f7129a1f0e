"""The ``hpc-profile`` command.

  hpc-profile show report.json                  a readable summary of one report
  hpc-profile compare A.json B.json [C.json…]   a table with ratios against A
        [--markdown] [--plot out.png] [--labels a,b,…]
  hpc-profile merge rank0.json rank1.json … -o report.json
                                                merge rank files (e.g. of a run that crashed)
  hpc-profile summarize metrics.jsonl KEY …     statistics of numeric fields of a JSONL log
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from profiling.compare import compare_table, differences, labels_for, plot
from profiling.report import RANK_KIND, ReportError, merge_reports, read_report, write_json
from profiling.show import show
from profiling.stats import STAT_KEYS, summarize


def read_series(path: Path, keys: list[str], skip: int = 0) -> dict[str, list[float]]:
    """The values of ``keys`` in a JSONL file, line by line, after the first ``skip`` lines."""
    series: dict[str, list[float]] = {k: [] for k in keys}
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if number <= skip or not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            for key in keys:
                if key in row:
                    series[key].append(float(row[key]))
    missing = [k for k, v in series.items() if not v]
    if missing:
        raise ValueError(f"{path}: no values for {', '.join(missing)}")
    return series


def _summarize(args: argparse.Namespace) -> int:
    series = read_series(Path(args.file), args.keys, skip=args.skip)
    width = max(len(k) for k in series)
    print(f"{'':<{width}}" + "".join(f"{s:>12}" for s in STAT_KEYS))
    for key, values in series.items():
        stats = summarize(values)
        print(f"{key:<{width}}" + "".join(f"{stats[s]:>12.4g}" for s in STAT_KEYS))
    return 0


def _show(args: argparse.Namespace) -> int:
    print(show(read_report(args.report)))
    return 0


def _compare(args: argparse.Namespace) -> int:
    reports = [read_report(p) for p in args.reports]
    labels = args.labels.split(",") if args.labels else labels_for(reports, args.reports)
    if len(labels) != len(reports):
        raise ReportError(f"--labels has {len(labels)} names for {len(reports)} reports")
    for note in differences(reports, labels):
        print(note)
    print(compare_table(reports, labels, markdown=args.markdown))
    if args.plot:
        print(f"plot -> {plot(reports, labels, args.plot)}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    ranks = [read_report(p, RANK_KIND) for p in args.ranks]
    base = read_report(args.like) if args.like else {}
    merged = merge_reports(ranks, run=base.get("run", {}), environment=base.get("environment", {}))
    print(f"merged {len(ranks)} ranks -> {write_json(args.output, merged)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpc-profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("show", help="a readable summary of one report")
    p.add_argument("report")
    p.set_defaults(func=_show)
    p = sub.add_parser("compare", help="reports side by side, with ratios against the first")
    p.add_argument("reports", nargs="+")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--plot", metavar="PNG", help="also write a bar chart of phases, throughput and memory")
    p.add_argument("--labels", help="comma-separated column names (default: the run modes)")
    p.set_defaults(func=_compare)
    p = sub.add_parser("merge", help="merge rank reports into one report")
    p.add_argument("ranks", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--like", help="take run and environment blocks from this report")
    p.set_defaults(func=_merge)
    p = sub.add_parser("summarize", help="statistics of numeric fields of a JSONL log")
    p.add_argument("file")
    p.add_argument("keys", nargs="+")
    p.add_argument("--skip", type=int, default=0, help="ignore the first N lines (warm-up)")
    p.set_defaults(func=_summarize)
    args = parser.parse_args(argv)
    if args.command == "compare" and len(args.reports) < 2:
        parser.error("compare needs at least two reports")
    try:
        return args.func(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
