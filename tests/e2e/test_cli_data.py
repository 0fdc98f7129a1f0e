"""The data commands as a user runs them: make-data, make-tiny, check-data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hpc_train.cli import main


def test_make_tiny_writes_a_loadable_folder(tmp_path, capsys):
    assert main(["make-tiny", "llava_onevision", str(tmp_path / "m")]) == 0
    assert "saved to" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize("family", ["smolvlm", "llava_onevision"])
def test_check_data_on_synthetic_set(synthetic_data, tiny_model_dirs, tmp_path, capsys, family):
    report_path = tmp_path / "audit.json"
    code = main(["check-data", f"tiny_{family}", f"model.path={tiny_model_dirs[family]}", "model.preset=null",
                 f"data.train={synthetic_data / 'train.jsonl'}",
                 "--json", str(report_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["records"] == report["usable"] == 40
    assert set(report["kinds"]) == {"image", "video", "audio", "multi_image", "text"}
    tokens = report["tokens"]
    assert tokens["total"]["min"] <= tokens["total"]["median"] <= tokens["total"]["p95"] <= tokens["total"]["max"]
    assert tokens["media"]["max"] > 0 and tokens["supervised"]["min"] >= 1
    # The example shows the answer marked as supervised and media collapsed.
    assert "[[" in report["example"] and "×" in report["example"]
    assert "tokens per sample" in out and "OK" in out


def test_check_data_fails_and_lists_every_problem(synthetic_data, tmp_path, capsys):
    data = tmp_path / "broken"
    shutil.copytree(synthetic_data, data)
    lines = (data / "train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    first = next(r for r in records if "image" in r)
    image = first["image"][0] if isinstance(first["image"], list) else first["image"]
    (data / image).unlink()
    clip = next(r for r in records if "video" in r)
    (data / clip["video"]).write_bytes(b"\x00not an mp4" * 100)
    lines.insert(3, '{"id": "broken json", ')
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")

    def line_of(record: dict) -> int:
        n = records.index(record) + 1
        return n + 1 if n > 3 else n  # the inserted broken line shifts what follows it

    code = main(["check-data", "tiny_smolvlm", f"data.train={data / 'train.jsonl'}", "data.media_root=null",
                 "data.max_seq_len=20"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"train.jsonl:{line_of(first)} [id {first['id']}]" in out and "not found" in out
    assert f"train.jsonl:{line_of(clip)} [id {clip['id']}]: {data / clip['video']}" in out
    assert "train.jsonl:4" in out and "JSON" in out
    assert "over max_seq_len=20" in out
    assert "FAILED" in out


def test_make_data_output_needs_only_data_train(tmp_path, synthetic_data, capsys):
    """The documented default media root (the dataset file's folder) fits make-data's records,
    and a media root kept from a config file for a dataset given on the command line is named."""
    assert main(["check-data", "tiny_smolvlm", f"data.train={synthetic_data / 'train.jsonl'}", "--limit", "12"]) == 0
    capsys.readouterr()
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  preset: tiny\ndata:\n  train: elsewhere/train.jsonl\n"
                      f"  media_root: {tmp_path / 'old_media'}\n")
    override = f"data.train={synthetic_data / 'train.jsonl'}"
    assert main(["check-data", str(config), override, "--limit", "12"]) == 1
    out = capsys.readouterr().out
    assert f"data.media_root was set by {config}:5, but data.train by override '{override}'" in out
    assert "Fix: set data.media_root to the folder this dataset's media paths are relative to, or " \
           "data.media_root=null for the dataset file's folder" in out


def test_check_data_config_errors_exit_2(capsys):
    assert main(["check-data", "tiny_smolvlm", "data.max_seqlen=3"]) == 2
    assert "did you mean 'data.max_seq_len'" in capsys.readouterr().err


def test_make_data_cli(tmp_path, capsys):
    assert main(["make-data", str(tmp_path / "d"), "--n-train", "5", "--n-eval", "5", "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(summary["counts"]["train"].values()) == 5
    assert Path(summary["train"]).is_file()


def test_convert_proassist_cli(tmp_path, capsys):
    dialog = {"video_uid": "abc", "video": "v.mp4", "conversation": [
        {"role": "frames", "start": 0.0, "end": 2.0},
        {"role": "user", "content": "Next?", "time": 2.0},
        {"role": "assistant", "content": "Cut.", "time": 2.5}]}
    src = tmp_path / "dialogs.jsonl"
    src.write_text(json.dumps(dialog) + "\n")
    out = tmp_path / "llava.jsonl"
    assert main(["convert-proassist", str(src), str(out)]) == 0
    assert "1 records written" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["video_clip"] == [0.0, 2.0] and record["conversations"][0]["value"].startswith("<video>")
    src.write_text('{"video_uid": 1\n')
    assert main(["convert-proassist", str(src), str(out)]) == 2
    assert "dialogs.jsonl:1" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's first command, shortened: every stage runs and reports (accuracy itself is
    measured by the full demo, see the README)."""
    from hpc_train.demo import run_demo

    out = tmp_path / "demo"
    assert run_demo(out, nproc=2, steps=12) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["steps"] == 12 and summary["processes"] == 2 and summary["zero_stage"] == 2
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    for path in ("run/metrics.jsonl", "run/model/model.safetensors", "run/eval_results.json",
                 "before/eval_results.json", "demo.yaml", "run/profile/report.json", "run/profile/rank1.json",
                 "results/profiling/baseline_profiling.json", "results/profiling/full_profiling.json",
                 "results/profiling/compare.png"):
        assert (out / path).is_file(), path
    printed = capsys.readouterr().out
    assert "demo finished" in printed and "backward mean (ms)" in printed
