"""The ``hpc-profile`` command.

``hpc-profile summarize metrics.jsonl KEY [KEY ...]`` prints count / mean / median / p95 /
min / max / std of numeric fields of a JSONL log (e.g. ``step_ms`` of a run's metrics).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpc-profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summarize", help="statistics of numeric fields of a JSONL log")
    p.add_argument("file")
    p.add_argument("keys", nargs="+")
    p.add_argument("--skip", type=int, default=0, help="ignore the first N lines (warm-up)")
    p.set_defaults(func=_summarize)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
