"""hpc-profile show / compare / merge on reports of a training and an evaluation-only run."""

from __future__ import annotations

import json

import pytest

from profiling.cli import main
from profiling.compare import compare_table, lookup
from profiling.report import merge_reports, write_json

from .test_profiling_report import rank_report


def report(workload: str, mode: str, step_ms: list[float], gpu: str | None = None) -> dict:
    ranks = [rank_report(k, step_ms, world=2, host=f"n{k}", workload=workload) for k in range(2)]
    return merge_reports(ranks, run={"mode": mode, "model": "smolvlm-256m", "zero_stage": 2, "max_seq_len": 512},
                         environment={"gpu_name": gpu, "torch": "2.14"})


@pytest.fixture
def files(tmp_path):
    base = write_json(tmp_path / "baseline.json", report("evaluation", "baseline", [10.0, 10.0]))
    qlora = write_json(tmp_path / "qlora.json", report("training", "qlora", [30.0, 30.0]))
    return base, qlora


def cells(table: str, label: str) -> list[str]:
    line = next(x for x in table.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_compare_shows_missing_phases_as_dashes_and_ratios_against_the_first(files, capsys):
    assert main(["compare", *map(str, files), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert cells(out, "metric") == ["metric", "baseline", "qlora", "qlora/baseline"]
    assert cells(out, "step mean (ms)") == ["step mean (ms)", "10", "30", "3.00x"]
    assert cells(out, "backward mean (ms)") == ["backward mean (ms)", "—", "4", "—"]
    assert cells(out, "forward mean (ms)") == ["forward mean (ms)", "3", "3", "1.00x"]
    assert cells(out, "workload") == ["workload", "evaluation", "training", ""]
    assert cells(out, "MFU") == ["MFU", "—", "—", "—"]


def test_plain_table_and_plot(files, tmp_path, capsys):
    png = tmp_path / "plots" / "compare.png"
    assert main(["compare", *map(str, files), "--plot", str(png), "--labels", "eval,QLoRA"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["metric", "eval", "QLoRA", "QLoRA/eval"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_compare_notes_what_else_differs(tmp_path, capsys):
    a = write_json(tmp_path / "a.json", report("training", "lora", [10.0], gpu="NVIDIA H100 80GB HBM3"))
    b = write_json(tmp_path / "b.json", report("training", "qlora", [12.0], gpu="NVIDIA A100-SXM4-80GB"))
    assert main(["compare", str(a), str(b)]) == 0
    assert "note: GPU differs: lora=NVIDIA H100 80GB HBM3, qlora=NVIDIA A100-SXM4-80GB" in capsys.readouterr().out


def test_same_modes_are_labelled_by_file(tmp_path):
    reports = [report("training", "lora", [10.0]), report("training", "lora", [20.0])]
    table = compare_table(reports, ["run1/report.json", "run2/report.json"])
    assert "run2/report.json/run1/report.json" in table.splitlines()[0]


@pytest.mark.parametrize(("content", "message"), [
    ('{"loss": 1}', "is this a profiling report"),
    ("not json", "not valid JSON"),
])
def test_bad_files_exit_2_with_the_file_named(files, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["compare", str(files[0]), str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and message in err


def test_compare_needs_two_reports_and_matching_labels(files, capsys):
    with pytest.raises(SystemExit):
        main(["compare", str(files[0])])
    assert main(["compare", *map(str, files), "--labels", "one"]) == 2
    assert "--labels has 1 names for 2 reports" in capsys.readouterr().err


def test_show_and_merge(files, tmp_path, capsys):
    assert main(["show", str(files[1])]) == 0
    out = capsys.readouterr().out
    assert "training run" in out and "ZeRO-2, 2 ranks on 2 node(s) (n0, n1)" in out
    assert "backward" in out and "slowest rank" in out
    ranks = []
    for k in range(2):
        ranks.append(write_json(tmp_path / f"rank{k}.json", rank_report(k, [5.0, 7.0], host="h")))
    merged = tmp_path / "merged.json"
    assert main(["merge", *map(str, ranks), "-o", str(merged), "--like", str(files[1])]) == 0
    result = json.loads(merged.read_text())
    assert lookup(result, "run.mode") == "qlora" and result["run"]["nodes"] == 1
    assert main(["merge", str(ranks[1]), "-o", str(merged)]) == 2
    assert "do not cover ranks 0..1" in capsys.readouterr().err
