"""Tests for hpc_train.data.sources.mixture and hpc_train.data.sources.proassist."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hpc_train.data.sources.mixture import Mixture, read_dataset
from hpc_train.data.sources.proassist import convert_dialog, convert_proassist
from hpc_train.data.sources.records import RecordFile, read_records
from hpc_train.errors import DataError


def write_jsonl(path: Path, prefix: str, n: int, **extra: object) -> Path:
    rows = [dict({"id": f"{prefix}{i}", "conversations": [
        {"from": "human", "value": "<image>\nq" if "image" in extra else "q"},
        {"from": "gpt", "value": f"a{i}"}]}, **extra) for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def two_sets(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "a.jsonl", "a", 100)
    write_jsonl(tmp_path / "sub" / "b.jsonl", "b", 40)
    return tmp_path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_mixture_fraction_and_repeat(two_sets):
    y = write_yaml(two_sets / "mix.yaml", """
datasets:
  - path: a.jsonl
    fraction: 0.25
  - path: sub/b.jsonl
    repeat: 2
""")
    mix = Mixture.from_yaml(y, seed=3)
    assert len(mix) == 25 + 80
    a_ids = [mix[i].id for i in range(25)]
    assert len(set(a_ids)) == 25 and all(i.startswith("a") for i in a_ids)
    assert a_ids == sorted(a_ids, key=lambda s: int(s[1:]))  # file order kept
    b_ids = [mix[i].id for i in range(25, len(mix))]
    assert b_ids == [f"b{i}" for i in range(40)] * 2
    s0, s1 = mix.sources
    assert (s0.index, s0.fraction, s0.repeat, s0.available, s0.taken) == (0, 0.25, 1, 100, 25)
    assert (s1.index, s1.fraction, s1.repeat, s1.available, s1.taken) == (1, 1.0, 2, 40, 80)
    assert s1.path == two_sets / "sub" / "b.jsonl"
    path, line = mix.location(30)
    assert path == s1.path and line == 6
    assert mix[np.int64(-1)].id == "b39"
    with pytest.raises(IndexError):
        mix[len(mix)]
    with pytest.raises(TypeError):
        mix[1.0]  # type: ignore[index]


def test_mixture_is_deterministic(two_sets):
    y = write_yaml(two_sets / "mix.yml", "datasets:\n  - path: a.jsonl\n    fraction: 0.1\n")
    ids = lambda seed: [r.id for r in Mixture.from_yaml(y, seed=seed)]  # noqa: E731
    assert ids(0) == ids(0)
    assert ids(1) == ids(1)
    assert ids(0) != ids(1)
    assert len(ids(5)) == 10


def test_tiny_fraction_takes_at_least_one(two_sets):
    y = write_yaml(two_sets / "mix.yaml", "datasets:\n  - path: sub/b.jsonl\n    fraction: 0.001\n")
    assert len(Mixture.from_yaml(y)) == 1


def test_mixture_media_root_and_ids_file(two_sets):
    media = two_sets / "media"
    media.mkdir()
    (media / "x.jpg").touch()
    write_jsonl(two_sets / "c.jsonl", "c", 5, image="x.jpg")
    (two_sets / "ids.txt").write_text("c1\nc4\nc9\n")
    y = write_yaml(two_sets / "mix.yaml", """
datasets:
  - path: c.jsonl
    media_root: media/
    ids_file: ids.txt
""")
    mix = read_dataset(y)
    assert isinstance(mix, Mixture)
    assert [r.id for r in mix] == ["c1", "c4"]
    assert mix[0].images == (media / "x.jpg",)
    assert mix.sources[0].missing_ids == {"c9"}
    assert mix.sources[0].media_root == media and mix.sources[0].ids_file == two_sets / "ids.txt"


def test_read_dataset_dispatch(two_sets):
    rf = read_dataset(two_sets / "a.jsonl")
    assert isinstance(rf, RecordFile) and len(rf) == 100
    (two_sets / "ids.txt").write_text("a7\n")
    assert [r.id for r in read_dataset(two_sets / "a.jsonl", ids_file=two_sets / "ids.txt")] == ["a7"]
    y = write_yaml(two_sets / "m.yaml", "datasets:\n  - path: a.jsonl\n")
    with pytest.raises(DataError, match="set media_root and ids_file per entry"):
        read_dataset(y, media_root=two_sets)


BAD_MIXTURES = [
    ("  - path: a.jsonl\n    fracton: 0.5\n", "unknown key 'fracton'", "did you mean 'fraction'?"),
    ("  - path: a.jsonl\n    fraction: 0\n", "0 < fraction <= 1 (got 0)", "fraction: 0.25"),
    ("  - path: a.jsonl\n    fraction: 1.5\n", "(got 1.5)", "repeat: 2"),
    ("  - path: a.jsonl\n    fraction: half\n", "(got 'half')", "fraction: 0.25"),
    ("  - path: a.jsonl\n    repeat: 0\n", "repeat must be an integer >= 1", "repeat: 2"),
    ("  - path: a.jsonl\n    repeat: 1.5\n", "(got 1.5)", "repeat: 2"),
    ("  - path: a.jsonl\n    repeat: 2\n    fraction: 0.5\n", "exclusive", "not both"),
    ("  - fraction: 0.5\n", "missing 'path'", "add 'path: <dataset file>'"),
    ("  - path: nope.jsonl\n", "dataset file not found", "check 'path'"),
    ("  - path: a.jsonl\n    ids_file: nope.txt\n", "ids_file not found", "check 'ids_file'"),
    ("  - path: a.jsonl\n    media_root: nowhere/\n", "media_root is not a directory",
     "check 'media_root'"),
    ("  - a.jsonl\n", "entry must be a mapping", "- path: file.jsonl"),
    ("  - path: other.yaml\n", "nested mixtures", "list the inner mixture's datasets"),
]


@pytest.mark.parametrize(("entry", "problem", "fix"), BAD_MIXTURES,
                         ids=[b[1][:24] for b in BAD_MIXTURES])
def test_bad_mixture_entries(two_sets, entry, problem, fix):
    # The bad entry is the second one (index 1), starting on line 4.
    y = write_yaml(two_sets / "mix.yaml",
                   "# mixture\ndatasets:\n  - path: sub/b.jsonl\n" + entry)
    with pytest.raises(DataError) as e:
        Mixture.from_yaml(y)
    msg = str(e.value)
    assert "mix.yaml:4: datasets[1]: " in msg
    assert problem in msg
    assert fix in msg.split("Fix: ", 1)[1]


@pytest.mark.parametrize(("text", "problem"), [
    ("datasets: [\n", "invalid YAML"),
    ("", "no top-level 'datasets' list"),
    ("datasets: []\n", "must be a non-empty list"),
    ("datasets:\n  - path: a.jsonl\nseed: 3\n", "unknown top-level key(s) ['seed']"),
])
def test_bad_mixture_files(two_sets, text, problem):
    y = write_yaml(two_sets / "mix.yaml", text)
    with pytest.raises(DataError, match="mix.yaml") as e:
        Mixture.from_yaml(y)
    assert problem in str(e.value) and "Fix: " in str(e.value)


def test_missing_mixture_file(tmp_path):
    with pytest.raises(DataError, match="mixture file not found"):
        read_dataset(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- ProAssist

EXAMPLE = {"video_uid": "abc", "video": "videos/abc.mp4", "conversation": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "frames", "start": 0.0, "end": 4.0},
    {"role": "user", "content": "What should I do next?", "time": 4.0},
    {"role": "assistant", "content": "Pick up the knife.", "time": 4.5},
    {"role": "frames", "start": 4.5, "end": 9.0},
    {"role": "assistant", "content": "Now cut the tomato.", "time": 9.0},
]}

# Merges, a proactive first turn, a user turn after frames, and a trailing user turn.
BUSY = {"video_uid": 7, "video": "/data/v7.mp4", "conversation": [
    {"role": "frames", "start": 1.0, "end": 2.0},
    {"role": "assistant", "content": "Hello, I see a pan.", "time": 2.0},
    {"role": "assistant", "content": "Heat it up.", "time": 2.25},
    {"role": "frames", "start": 2.25, "end": 5.0},
    {"role": "user", "content": "Like this?", "time": 5.0},
    {"role": "user", "content": "Or hotter?", "time": 5.5},
    {"role": "assistant", "content": "Hotter. 🔥", "time": 6.0},
    {"role": "frames", "start": 6.0, "end": 8.0},
    {"role": "assistant", "content": "Good.", "time": 8.0},
    {"role": "frames", "start": 8.0, "end": 12.0},
    {"role": "user", "content": "Thanks!", "time": 12.0},
]}


def sides(rec: dict) -> list[str]:
    return [t["from"] for t in rec["conversations"]]


def test_convert_example():
    (rec,) = convert_dialog(EXAMPLE)
    assert rec == {"id": "abc", "video": "videos/abc.mp4", "video_clip": [0.0, 9.0],
                   "conversations": [
                       {"from": "system", "value": "You are a helpful assistant."},
                       {"from": "human", "value": "<video>\n[t=4.0s] What should I do next?"},
                       {"from": "gpt", "value": "[t=4.5s] Pick up the knife."},
                       {"from": "human", "value": "[t=4.5s-9.0s] (watching)"},
                       {"from": "gpt", "value": "[t=9.0s] Now cut the tomato."}]}


def test_convert_merges_and_alternates():
    (rec,) = convert_dialog(BUSY)
    # Trailing frames and the unanswered user turn are dropped, so the clip ends at 8.0.
    assert rec["id"] == "7" and rec["video_clip"] == [1.0, 8.0]
    assert sides(rec) == ["human", "gpt"] * 3
    values = [t["value"] for t in rec["conversations"]]
    assert values == [
        "<video>\n[t=1.0s-2.0s] (watching)",
        "[t=2.0s] Hello, I see a pan.\n[t=2.25s] Heat it up.",
        "[t=5.0s] Like this?\n[t=5.5s] Or hotter?",
        "[t=6.0s] Hotter. 🔥",
        "[t=6.0s-8.0s] (watching)",
        "[t=8.0s] Good.",
    ]  # the trailing user turn has no answer and is dropped
    assert sum(v.count("<video>") for v in values) == 1


def test_proactive_turn_without_frames_is_tagged_with_its_time():
    dialog = {"video_uid": "p", "video": "p.mp4", "conversation": [
        {"role": "assistant", "content": "Starting.", "time": 3.0},
        {"role": "frames", "start": 3.0, "end": 6.0}]}
    (rec,) = convert_dialog(dialog)
    assert rec["conversations"][0]["value"] == "<video>\n[t=3.0s] (watching)"
    assert "video_clip" not in rec  # no frames in the window and a zero-length span


@pytest.mark.parametrize(("max_turns", "expected"), [
    # Window #1 is the lone 2.25 s turn: no frames of its own, so no clip.
    (1, [("7#0", [1.0, 2.0]), ("7#1", None), ("7#2", [2.25, 5.0]), ("7#3", [6.0, 8.0])]),
    (2, [("7#0", [1.0, 2.0]), ("7#1", [2.25, 8.0])]),
    (10, [("7#0", [1.0, 8.0])]),
])
def test_convert_windows(max_turns, expected):
    recs = convert_dialog(BUSY, max_turns)
    assert [(r["id"], r.get("video_clip")) for r in recs] == expected
    if max_turns == 1:
        assert recs[1]["conversations"] == [
            {"from": "human", "value": "<video>\n[t=2.25s] (watching)"},
            {"from": "gpt", "value": "[t=2.25s] Heat it up."}]
    for r in recs:
        values = [t["value"] for t in r["conversations"]]
        assert values[0].startswith("<video>\n") and sum(v.count("<video>") for v in values) == 1
        assert sides(r) == ["human", "gpt"] * (len(r["conversations"]) // 2)
    # Each window keeps only its own assistant turns.
    assert sum(len(r["conversations"]) for r in convert_dialog(EXAMPLE, 1)) == 3 + 3


def test_convert_file_round_trip(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(EXAMPLE) + "\n\n" + json.dumps(dict(BUSY, video="v7.mp4")) + "\n")
    out = tmp_path / "out" / "llava.jsonl"
    assert convert_proassist(src, out) == 2
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "abc.mp4").touch()
    (tmp_path / "v7.mp4").touch()
    rf = read_records(out, media_root=tmp_path)
    assert [r.id for r in rf] == ["abc", "7"]
    assert rf[0].videos == (tmp_path / "videos" / "abc.mp4",)
    assert rf[0].video_clip == (0.0, 9.0)
    assert [t.role for t in rf[1].turns] == ["user", "assistant"] * 3
    assert rf[1].video_clip == (1.0, 8.0)
    assert "🔥" in out.read_text(encoding="utf-8")
    assert not list(out.parent.glob(".*tmp*"))

    windows = tmp_path / "w.jsonl"
    src_json = tmp_path / "in.json"
    src_json.write_text(json.dumps([EXAMPLE, BUSY], indent=2))
    assert convert_proassist(src_json, windows, max_turns=1) == 2 + 4
    rw = read_records(windows, media_root=tmp_path, check_media_exists=False, allow_outside_root=True)
    assert [r.id for r in rw] == ["abc#0", "abc#1", "7#0", "7#1", "7#2", "7#3"]


BAD_DIALOGS = [
    ({"video": "v.mp4", "conversation": []}, "bad:2", "no usable 'video_uid'", "add \"video_uid\""),
    ({"video_uid": "d", "conversation": [{"role": "assistant", "content": "x", "time": 1}]},
     "d", "no 'video' path", "add \"video\""),
    ({"video_uid": "d", "video": "v.mp4", "conversation": []}, "d",
     "'conversation' must be a non-empty list", "each dialog is"),
    ({"video_uid": "d", "video": "v.mp4", "conversation": [{"role": "narrator", "content": "x"}]},
     "d", "unknown role 'narrator'; valid roles: system, frames, user, assistant",
     "set 'role' to one of"),
    ({"video_uid": "d", "video": "v.mp4", "conversation": [{"role": "frames", "start": 1}]},
     "d", "conversation[0] frames need numeric 'start' <= 'end'", '"start": 0.0, "end": 4.0'),
    ({"video_uid": "d", "video": "v.mp4", "conversation": [{"role": "assistant", "content": "x"}]},
     "d", "conversation[0] (assistant) needs a numeric 'time'", 'add "time"'),
    ({"video_uid": "d", "video": "v.mp4", "conversation": [{"role": "user", "content": "", "time": 1}]},
     "d", "conversation[0] (user) has no text 'content'", "non-empty string 'content'"),
    ({"video_uid": "d", "video": "v.mp4",
      "conversation": [{"role": "user", "content": "hi?", "time": 1}]},
     "d", "dialog has no assistant turn", "add at least one"),
]


@pytest.mark.parametrize(("dialog", "rid", "problem", "fix"), BAD_DIALOGS,
                         ids=[b[2][:30] for b in BAD_DIALOGS])
def test_convert_errors(tmp_path, dialog, rid, problem, fix):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(EXAMPLE) + "\n" + json.dumps(dialog) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError) as e:
        convert_proassist(src, out)
    msg = str(e.value)
    assert f"bad.jsonl:2 [id {rid}]: " in msg
    assert problem in msg
    assert fix in msg.split("Fix: ", 1)[1]
    assert not out.exists() and list(tmp_path.iterdir()) == [src]  # nothing half-written


def test_convert_malformed_input_and_args(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(EXAMPLE) + "\n" + '{"video_uid": "m", "video": }\n')
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    with pytest.raises(DataError, match=r"in.jsonl:2 \[id m\]: malformed JSON"):
        convert_proassist(src, out)
    assert out.read_text() == "previous\n"  # an existing output survives a failed run
    with pytest.raises(ValueError, match="max_turns"):
        convert_proassist(src, out, max_turns=0)
    with pytest.raises(DataError, match="in.jsonl:1: dialog is not a JSON object"):
        convert_dialog(["no"], path=src, line=1)
