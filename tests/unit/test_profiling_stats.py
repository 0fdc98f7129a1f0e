"""profiling.stats and `hpc-profile summarize`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from profiling.cli import main
from profiling.stats import summarize


def test_summarize_known_series():
    stats = summarize(range(1, 101))
    assert stats["count"] == 100
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["median"] == pytest.approx(50.5)
    assert stats["p95"] == pytest.approx(95.05)
    assert (stats["min"], stats["max"]) == (1.0, 100.0)
    assert stats["std"] == pytest.approx(np.std(np.arange(1, 101)))


def test_summarize_refuses_empty_and_non_finite():
    with pytest.raises(ValueError, match="no values"):
        summarize([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize([1.0, float("nan")])


def test_cli_summarizes_jsonl_after_warmup(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "step_ms": 1000.0 if i < 2 else 10.0 + i} for i in range(12)]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["summarize", str(log), "step_ms", "--skip", "2"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("step_ms"))
    values = line.split()[1:]
    assert float(values[0]) == 10  # count: warm-up lines skipped
    assert float(values[5]) == 21  # max is not one of the 1000 ms warm-up steps


def test_cli_errors_name_file_and_line(tmp_path, capsys):
    log = tmp_path / "bad.jsonl"
    log.write_text('{"step_ms": 1}\n{oops\n')
    assert main(["summarize", str(log), "step_ms"]) == 2
    assert f"{log}:2: not valid JSON" in capsys.readouterr().err
    log.write_text('{"loss": 1}\n')
    assert main(["summarize", str(log), "step_ms"]) == 2
    assert "no values for step_ms" in capsys.readouterr().err
