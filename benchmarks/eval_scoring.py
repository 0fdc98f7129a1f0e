"""What scoring an evaluation costs on the host after generation: ``eval.metrics`` over a
COCO-sized caption set (5,000 records, 5 references each, 8-14 words), each metric over
every kind, a paired bootstrap of all five (``hpc-train compare-eval``, 1,000 draws), and the
size of the records in eval_results.json. Rank 0 does this while the other ranks wait at the
next collective, so it must stay small beside generation itself.

    python benchmarks/eval_scoring.py [--records 5000] [--references 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpc_train.evaluation.bootstrap import paired_bootstrap  # noqa: E402
from hpc_train.evaluation.metrics import METRICS, score_rows, summarize  # noqa: E402

WORDS = ("a man woman dog cat runs sits on the grass street table red blue small large near with "
         "holding ball phone two people riding bike beach water").split()


def sentences(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 15)))) + "." for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--references", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    refs = [sentences(rng, args.references) for _ in range(args.records)]
    kinds = rng.choice(["image", "video"], size=args.records)
    systems = [[{"id": str(i), "kind": str(kinds[i]), "prediction": said, "references": refs[i]}
                for i, said in enumerate(sentences(rng, args.records))] for _ in range(2)]
    started = time.perf_counter()
    score_rows(systems[0], METRICS)
    scored = time.perf_counter() - started
    score_rows(systems[1], METRICS)
    started = time.perf_counter()
    summarize(systems[0], METRICS)
    summed = time.perf_counter() - started
    started = time.perf_counter()
    paired_bootstrap(systems[0], systems[1], list(METRICS))
    booted = time.perf_counter() - started
    size = len(json.dumps(systems[0], indent=2)) / 2**20
    print(f"{args.records} records x {args.references} references: scoring every metric {scored:.1f} s, "
          f"per kind {summed * 1000:.0f} ms, paired bootstrap of 5 metrics x 1000 draws {booted:.2f} s, "
          f"records in eval_results.json {size:.1f} MiB")


if __name__ == "__main__":
    main()
