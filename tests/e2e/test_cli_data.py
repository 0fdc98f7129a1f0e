"""The data commands as a user runs them: make-data, make-tiny, check-data."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from hpc_train.cli import main
from tests.conftest import FAMILIES


def test_make_tiny_writes_a_loadable_folder(tmp_path, capsys):
    assert main(["make-tiny", "llava_onevision", str(tmp_path / "m")]) == 0
    assert "saved to" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_check_data_on_synthetic_set(synthetic_data, tiny_model_dirs, tmp_path, capsys, family):
    """Each family's saved folder through its shipped LoRA recipe, the family read from the folder."""
    report_path = tmp_path / "audit.json"
    code = main(["check-data", f"{family}_lora", f"model.path={tiny_model_dirs[family]}",
                 f"data.train={synthetic_data / 'train.jsonl'}", "data.media_root=null", "data.max_seq_len=4096",
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
    """The README's first command, shortened, with half the pictures and videos asking for a
    caption: every stage runs and reports, and 300 steps teach the captions (the colour answers'
    accuracy is measured by the full demo, see the README)."""
    from hpc_train.demo import run_demo

    out = tmp_path / "demo"
    assert run_demo(out, nproc=2, steps=300, captions=0.5) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["steps"] == 300 and summary["processes"] == 2 and summary["zero_stage"] == 2
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    before, after = summary["metrics_before"], summary["metrics_after"]
    assert before["bleu4"] < 0.05 and before["cider"] < 0.1  # a random model says nothing of the kind
    assert after["bleu4"] > 0.4 and after["rouge_l"] > 0.3 and after["cider"] > 0.8
    for path in ("run/metrics.jsonl", "run/model/model.safetensors", "run/eval_results.json",
                 "before/eval_results.json", "demo.yaml", "run/profile/report.json", "run/profile/rank1.json",
                 "results/profiling/baseline_profiling.json", "results/profiling/full_profiling.json",
                 "results/profiling/compare.png", "results/compare_eval.png"):
        assert (out / path).is_file(), path
    printed = capsys.readouterr().out
    assert "demo finished" in printed and "backward mean (ms)" in printed
    assert re.search(r"\ncider +all +120 +[0-9.]+ +[0-9.]+ +\+[0-9.]+ +\[\+[0-9.]+, \+[0-9.]+\] +better\n", printed)


def _copy_with(synthetic_data: Path, tmp_path: Path, change) -> tuple[Path, list[dict]]:
    """The synthetic set copied (media too), its records changed by ``change(records)``."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    change(records)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return data / "train.jsonl", records


def test_check_data_flags_duplicate_and_empty_ids_and_control_tokens(synthetic_data, tmp_path, capsys):
    def change(records):
        records[1]["id"] = records[0]["id"]
        records[2]["id"] = " "
        records[3]["conversations"][0]["value"] += " <|im_start|>assistant"
        records[4]["conversations"][-1]["value"] += "<end_of_utterance>"

    path, records = _copy_with(synthetic_data, tmp_path, change)
    assert main(["check-data", "tiny_smolvlm", f"data.train={path}", "--json", str(tmp_path / "a.json")]) == 1
    out = capsys.readouterr().out
    assert f"train.jsonl:2 [id {records[0]['id']}]: duplicate id (first used by the record at line 1). Fix:" in out
    assert "train.jsonl:3 [id train:3]: 'id' is empty. Fix:" in out
    assert (f"train.jsonl:4 [id {records[3]['id']}]: conversations[0] (user) contains the chat template's "
            "control token <|im_start|>. Fix: remove it") in out
    assert f"train.jsonl:5 [id {records[4]['id']}]: conversations[1] (assistant) contains" in out
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["usable"] == len(records) - 4 and len(report["errors"]) == 4


def test_check_data_counts_over_long_samples_unusable_with_a_fix(synthetic_data, tmp_path, capsys):
    args = ["check-data", "tiny_smolvlm", f"data.train={synthetic_data / 'train.jsonl'}"]
    as_json = ["--json", str(tmp_path / "a.json")]
    assert main([*args, *as_json]) == 0
    longest = int(json.loads((tmp_path / "a.json").read_text())["tokens"]["total"]["max"])
    limit = f"data.max_seq_len={longest - 1}"
    assert main([*args, limit, *as_json]) == 0  # truncation=drop: training leaves it out, the audit says so
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["usable"] == report["records"] - len(report["over_max_seq_len"]) >= 1
    assert re.search(rf"train.jsonl:\d+ \[id \S+\]: {longest} tokens \(\d+ from media\), over "
                     rf"data.max_seq_len={longest - 1}. Fix: raise data.max_seq_len to {longest}, .*"
                     "data.truncation=drop leaves it out of training", out)
    assert main([*args, limit, "data.truncation=error"]) == 1
    assert "stops training at it" in capsys.readouterr().out


def test_check_data_names_a_utf16_file_and_cr_only_line_endings(synthetic_data, tmp_path, capsys):
    lines = (synthetic_data / "train.jsonl").read_text().splitlines()[:3]
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text("\n".join(lines) + "\n", encoding="utf-16")
    assert main(["check-data", "tiny_smolvlm", f"data.train={utf16}"]) == 2
    assert (f"{utf16}:1: file is UTF-16 (little-endian), not UTF-8 JSON. Fix: re-save it as UTF-8"
            in capsys.readouterr().err)
    old_mac = synthetic_data / "old_mac.jsonl"  # beside the media, so only the endings are wrong
    old_mac.write_bytes(("\r".join(lines) + "\r").encode())
    try:
        assert main(["check-data", "tiny_smolvlm", f"data.train={old_mac}"]) == 1
    finally:
        old_mac.unlink()
    assert (f"{old_mac}:1 [id old_mac:1]: records are separated by bare carriage returns (CR, old Mac line "
            "endings), so the file reads as one line. Fix: convert the line endings to LF") in capsys.readouterr().out


def test_check_data_catches_llava_videos_that_cannot_share_a_packed_row(synthetic_data, tiny_model_dirs,
                                                                        tmp_path, capsys):
    def change(records):
        short = next(r for r in records if "video" in r and "video_clip" not in r)
        short["video_clip"] = [0, 0.5]  # 2 of the 8 source frames (4 fps)

    path, records = _copy_with(synthetic_data, tmp_path, change)
    short = next(i for i, r in enumerate(records) if r.get("video_clip") == [0, 0.5])
    base = ["check-data", "tiny_llava_onevision", f"model.path={tiny_model_dirs['llava_onevision']}",
            "model.preset=null", f"data.train={path}", "data.max_seq_len=4096"]
    assert main([*base, "data.packing=true"]) == 1
    out = capsys.readouterr().out
    assert (f"{path}: videos sample to different frame counts (2 frames: 1 video(s), e.g. {path}:{short + 1} "
            f"[id {records[short]['id']}]; 4 frames:") in out  # the recipe's num_frames
    assert "stacks the videos of a packed row" in out
    assert "Fix: make every video give the same count: data.video.sampling=uniform data.video.num_frames=2" in out
    assert main([*base, "train.micro_batch_size=1"]) == 0  # one sample per batch: nothing to stack
    capsys.readouterr()


def test_check_data_survives_the_records_that_used_to_crash_it(synthetic_data, tmp_path, capsys):
    """Each of these once ended the whole audit with a traceback; now each is one record's error."""
    records = [json.loads(line) for line in (synthetic_data / "train.jsonl").read_text().splitlines()]
    video = next(r for r in records if isinstance(r.get("video"), str))
    long_path = dict(video, id="long-path", video="v" * 5000 + ".mp4")
    huge_clip = dict(video, id="huge-clip", video_clip=[0, 1e308])
    lines = [json.dumps(long_path), json.dumps(huge_clip),
             '{"id": "deep", "conversations": ' + "[" * 1000 + "]" * 1000 + "}",
             '{"id": "digits", "video_clip": [0, ' + "9" * 5000 + "]}", json.dumps(records[0])]
    path = synthetic_data / "crashers.jsonl"  # beside the media, so the huge clip's video is found
    path.write_text("\n".join(lines) + "\n")
    try:
        assert main(["check-data", "tiny_smolvlm", f"data.train={path}"]) == 1
    finally:
        path.unlink()
    out = capsys.readouterr().out
    assert "records: 5   usable: 2   with errors: 3" in out  # the huge clip is clamped to the video
    assert f"{path}:1 [id long-path]: video path vvvv" in out and "cannot be opened (File name too long)" in out
    assert f"{path}:3 [id crashers:3]: record nests arrays / objects too deeply" in out
    assert f"{path}:4 [id crashers:4]: record holds a number Python cannot read" in out
