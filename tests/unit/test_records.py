"""Tests for hpc_train.data.sources.records: indexing, parsing, validation messages."""

from __future__ import annotations

import json
import pickle
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from hpc_train.data.sources import record_index, records
from hpc_train.data.sources.records import (
    PLACEHOLDERS,
    ROLES,
    Record,
    RecordFile,
    Turn,
    read_id_filter,
    read_records,
)
from hpc_train.errors import DataError, MediaError

BAD = Path(__file__).resolve().parents[1] / "data" / "bad_records"

# file, line of the error (None: whole file), record id (None: no record), fix phrase
CORPUS = [
    ("empty.jsonl", None, None, "add records"),
    ("blank_lines.jsonl", None, None, "add records"),
    ("empty_array.json", None, None, "add records"),
    ("malformed_line.jsonl", 2, "bad-json", "one complete JSON object"),
    ("malformed_record.json", 7, "bad-json", "fix the JSON syntax"),
    ("not_array.json", 1, None, "top-level array"),
    ("top_level_string.json", 1, None, "top-level array"),
    ("trailing_comma.json", 3, None, "remove the comma"),
    ("unterminated_array.json", 3, None, "every '[' / '{' is closed"),
    ("extra_after_array.json", 2, None, "remove everything after the final ']'"),
    ("not_object.jsonl", 2, "not_object:2", "each record must be an object"),
    ("not_object.json", 3, "not_object:3", "each record must be an object"),
    ("missing_conversations.jsonl", 2, "no-conv", "add a 'conversations' list"),
    ("missing_conversations.json", 15, "no-conv", "add a 'conversations' list"),
    ("empty_conversations.jsonl", 2, "empty-conv", "add at least one human turn"),
    ("turn_missing_from.jsonl", 2, "no-from", "add 'from' to the turn"),
    ("turn_missing_value.jsonl", 2, "no-value", "add 'value' to the turn"),
    ("unknown_role.jsonl", 2, "bot-role", "set 'from' to one of: assistant, gpt, human"),
    ("unknown_role.json", 15, "bot-role", "set 'from' to one of: assistant, gpt, human"),
    ("non_string_value.jsonl", 2, "num-value", "write the turn text as a JSON string"),
    ("no_assistant.jsonl", 2, "no-gpt", "turn with the target answer"),
    ("empty_assistant.jsonl", 2, "empty-gpt", "write the target answer"),
    ("image_count_mismatch.jsonl", 2, "img-count", "exactly one <image>"),
    ("image_count_mismatch.json", 15, "img-count", "exactly one <image>"),
    ("video_count_mismatch.jsonl", 2, "vid-count", "exactly one <video>"),
    ("audio_count_mismatch.jsonl", 2, "audio-count", "exactly one <speech>"),
    ("placeholder_in_assistant.jsonl", 2, "gpt-image", "move <image> into the user turn"),
    ("missing_media.jsonl", 2, "no-file", "check media_root"),
    ("bad_media_type.jsonl", 2, "media-type", '"image": "relative/path"'),
    ("bad_video_clip.jsonl", 2, "bad-clip", "0 <= start < end"),
    ("bad_id.jsonl", 2, "bad_id:2", "write the id as a string"),
    ("not_utf8.jsonl", 2, "not_utf8:2", "re-save the file as UTF-8"),
]
# Key phrase of the problem itself, where the brief asks for specific content.
PROBLEM = {
    "malformed_line.jsonl": "column 55",
    "malformed_record.json": "column 7",
    "unknown_role.jsonl": "valid roles: assistant, gpt, human, system, user",
    "image_count_mismatch.jsonl": "found 2 <image> placeholder(s) in the turns but 1 image",
    "video_count_mismatch.jsonl": "found 1 <video> placeholder(s) in the turns but 2 video",
    "audio_count_mismatch.jsonl": "found 0 <speech> placeholder(s) in the turns but 1 audio",
    "missing_media.jsonl": "does_not_exist.jpg (media_root: ",
}

GOOD = {"id": "ok1", "conversations": [{"from": "human", "value": "Hello?"},
                                       {"from": "gpt", "value": "Hi."}]}


def only_error(path: Path) -> DataError:
    """The single DataError a corpus file produces, at open time or on access."""
    try:
        rf = RecordFile(path)
    except DataError as e:
        return e
    errors = []
    for i in range(len(rf)):
        try:
            rf[i]
        except DataError as e:
            errors.append(e)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


@pytest.mark.parametrize(("name", "line", "rid", "fix"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_record_corpus(name, line, rid, fix):
    err = only_error(BAD / name)
    msg = str(err)
    where = f"{name}:{line}" if line is not None else f"{name}: "
    assert where in msg
    assert err.line == line
    if rid is not None:
        assert f"[id {rid}]" in msg
    else:
        assert "[id " not in msg
    assert f"Fix: {fix}" in msg or fix in msg.split("Fix: ", 1)[1]
    if name in PROBLEM:
        assert PROBLEM[name] in msg
    if name == "missing_media.jsonl":
        assert isinstance(err, MediaError)


def test_corpus_is_complete():
    on_disk = {p.name for p in BAD.iterdir() if p.is_file()}
    assert on_disk == {c[0] for c in CORPUS}


def test_constants():
    assert ROLES["human"] == ROLES["user"] == "user"
    assert ROLES["gpt"] == ROLES["assistant"] == "assistant"
    assert ROLES["system"] == "system"
    assert PLACEHOLDERS == {"image": "<image>", "video": "<video>", "audio": "<speech>"}


# Strings chosen to confuse a naive bracket / quote scanner.
TRICKY = [
    'quote " and escaped backslash \\',
    "brackets ] } [ { inside, commas , , ,",
    'backslash before quote \\" still inside',
    "unicode: café, 日本語, emoji 🎉, \u2028 separator",
    "ends with backslash \\",
    'json-ish {"from": "gpt"}]},',
    "newline\nand tab\t",
]


def make_records(n: int) -> list[dict]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        text = TRICKY[i % len(TRICKY)] + f" #{i}"
        rec: dict = {"id": f"r{i}", "conversations": [
            {"from": "human", "value": text},
            {"from": "gpt", "value": f"answer {i} " + rng.choice(TRICKY)},
        ]}
        if i % 3 == 0:
            rec["conversations"].insert(0, {"from": "system", "value": "sys ]"})
        out.append(rec)
    return out


def write_pretty(path: Path, recs: list[dict]) -> list[int]:
    """Write a pretty-printed JSON array; return the line each record starts on."""
    lines = ["["]
    starts = []
    for k, rec in enumerate(recs):
        starts.append(len(lines) + 1)
        # split("\n"), not splitlines(): the latter also splits at a raw U+2028.
        body = json.dumps(rec, indent=2, ensure_ascii=False).split("\n")
        body = ["  " + b for b in body]
        if k < len(recs) - 1:
            body[-1] += ","
        lines.extend(body)
    lines.append("]")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return starts


def key(rec: Record) -> tuple:
    return rec.id, rec.turns, rec.images, rec.videos, rec.audios, rec.video_clip


@pytest.mark.parametrize("chunk", [3, 61, 1 << 20])
def test_json_and_jsonl_round_trip(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(record_index, "_CHUNK_BYTES", chunk)
    recs = make_records(40)
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), "utf-8")
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(recs), encoding="utf-8")  # one line, \u escapes
    pretty = tmp_path / "pretty.data"  # extension ignored: detected by content
    starts = write_pretty(pretty, recs)

    a, b, c = RecordFile(jl), RecordFile(compact), RecordFile(pretty)
    assert (a.format, b.format, c.format) == ("jsonl", "json", "json")
    assert len(a) == len(b) == len(c) == 40
    for i, rec in enumerate(recs):
        assert key(a[i]) == key(b[i]) == key(c[i])
        assert a[i].turns[-2].text == rec["conversations"][-2]["value"]
        assert a.location(i) == (jl.absolute(), i + 1)
        assert b.location(i)[1] == 1
        assert c.location(i) == (pretty.absolute(), starts[i])
        assert c[i].line == starts[i] and c[i].source == pretty.absolute()


def test_blank_lines_bom_and_crlf(tmp_path):
    p = tmp_path / "d.jsonl"
    line = json.dumps(GOOD).encode()
    p.write_bytes(b"\xef\xbb\xbf" + line + b"\r\n\r\n  \n" + line.replace(b"ok1", b"ok2") + b"\r\n")
    rf = RecordFile(p)
    assert [r.id for r in rf] == ["ok1", "ok2"]
    assert [rf.location(i)[1] for i in range(2)] == [1, 4]
    q = tmp_path / "d.json"
    q.write_bytes(b"\xef\xbb\xbf\r\n[\r\n" + line + b"\r\n]\r\n")
    assert RecordFile(q)[0].line == 3


def test_malformed_json_in_compact_array_reports_true_column(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"id": "a", "conversations": []}, {"id": "b" "conversations": []}]')
    rf = RecordFile(p)
    with pytest.raises(DataError) as e:
        rf[1]
    # The record starts at column 36; the missing comma is at column 47 of the line.
    assert "d.json:1 [id b]" in str(e.value) and "column 47" in str(e.value)


def big_records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "conversations": [
        {"from": "human", "value": f"q{i} [{{\"x\\\"]"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(n)]


def test_indexing_streams_without_parsing(tmp_path, monkeypatch):
    p = tmp_path / "mid.json"
    p.write_text("[\n" + ",\n".join(json.dumps(r) for r in big_records(2000)) + "\n]\n")
    size = p.stat().st_size
    monkeypatch.setattr(record_index, "_CHUNK_BYTES", 1 << 12)
    calls = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: calls.append(1) or real_loads(*a, **k))
    tracemalloc.start()
    try:
        rf = RecordFile(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert calls == []  # no record was parsed while indexing
    assert peak < size / 2, (peak, size)  # the file was never held whole
    assert len(rf) == 2000 and rf[1999].id == "r1999"


def test_large_file_random_access(tmp_path):
    n = 20_000
    recs = big_records(n)
    p = tmp_path / "big.json"
    p.write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n", encoding="utf-8")
    rf = RecordFile(p)
    assert len(rf) == n
    for i in random.Random(0).sample(range(n), 5) + [0, n - 1]:
        assert rf[i].id == f"r{i}"
        assert rf.location(i)[1] == i + 2
        assert rf[i].turns == (Turn("user", recs[i]["conversations"][0]["value"]),
                               Turn("assistant", f"a{i}"))
    jl = tmp_path / "big.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    rj = RecordFile(jl)
    assert len(rj) == n and rj[-1].id == f"r{n - 1}" and rj.location(12345)[1] == 12346


def test_sequence_protocol_and_pickle(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(dict(GOOD, id=f"x{i}")) + "\n" for i in range(3)))
    rf = RecordFile(p)
    assert [r.id for r in rf] == ["x0", "x1", "x2"]
    assert rf[-1].id == "x2" and rf[np.int64(1)].id == "x1"
    with pytest.raises(IndexError):
        rf[3]
    with pytest.raises(TypeError):
        rf["0"]  # type: ignore[index]
    clone = pickle.loads(pickle.dumps(rf))
    assert key(clone[1]) == key(rf[1])


def test_default_id_and_int_id(tmp_path):
    p = tmp_path / "noid.jsonl"
    rec = {k: v for k, v in GOOD.items() if k != "id"}
    p.write_text("\n" + json.dumps(rec) + "\n" + json.dumps(dict(rec, id=17)) + "\n")
    rf = RecordFile(p)
    assert [r.id for r in rf] == ["noid:2", "17"]


def test_turns_roles_and_audio_alias(tmp_path):
    p = tmp_path / "d.jsonl"
    (tmp_path / "a.wav").touch()
    p.write_text(json.dumps({"id": "s", "audio": "a.wav", "conversations": [
        {"from": "system", "value": "sys"}, {"from": "user", "value": "<audio>\nWhat?"},
        {"from": "assistant", "value": "Words."}]}) + "\n")
    rec = RecordFile(p)[0]
    assert rec.turns == (Turn("system", "sys"), Turn("user", "<speech>\nWhat?"),
                         Turn("assistant", "Words."))
    assert rec.audios == (tmp_path.absolute() / "a.wav",)
    assert rec.has_media()


def test_llava_video_alias(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [
        {"id": "one", "video": "v.mp4",
         "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                           {"from": "gpt", "value": "Stuff."}]},
        {"id": "two", "video": ["v.mp4", "w.mp4"],
         "conversations": [{"from": "human", "value": "<image> then <image>"},
                           {"from": "gpt", "value": "Same."}]},
        # Has an image too: no aliasing, so the counts do not match.
        {"id": "mixed", "video": "v.mp4", "image": "i.jpg",
         "conversations": [{"from": "human", "value": "<image>"},
                           {"from": "gpt", "value": "x"}]},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rf = RecordFile(p, check_media_exists=False)
    assert rf[0].turns[0].text == "<video>\nWhat happens?"
    assert rf[1].turns[0].text == "<video> then <video>"
    assert rf[1].videos == (tmp_path.absolute() / "v.mp4", tmp_path.absolute() / "w.mp4")
    with pytest.raises(DataError, match="0 <video> placeholder"):
        rf[2]


def test_media_path_resolution(tmp_path):
    data = tmp_path / "data"
    media = tmp_path / "media"
    (media / "imgs").mkdir(parents=True)
    (media / "imgs" / "a.jpg").touch()
    (media / "b.jpg").touch()
    data.mkdir()
    (data / "local.jpg").touch()
    absolute = tmp_path / "abs.mp4"
    absolute.touch()
    p = data / "d.jsonl"
    rows = [
        {"id": "m", "image": ["imgs/a.jpg", "b.jpg"], "video": str(absolute),
         "video_clip": [1, 2.5],
         "conversations": [{"from": "human", "value": "<image><image><video>"},
                           {"from": "gpt", "value": "ok"}]},
        {"id": "l", "image": "local.jpg",
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}]},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = read_records(p, media_root=media, allow_outside_root=True)[0]
    assert rec.images == (media / "imgs" / "a.jpg", media / "b.jpg")
    assert rec.videos == (absolute,)
    assert rec.video_clip == (1.0, 2.5)
    with pytest.raises(MediaError) as e:
        read_records(p, media_root=media)[1]
    assert str(media / "local.jpg") in str(e.value) and f"media_root: {media}" in str(e.value)
    # Default media_root is the dataset file's folder.
    assert read_records(p)[1].images == (data / "local.jpg",)
    # Without the existence check, missing files are fine.
    assert read_records(p, media_root=tmp_path / "nowhere", check_media_exists=False,
                        allow_outside_root=True)[0].images[1] == tmp_path / "nowhere" / "b.jpg"


@pytest.mark.parametrize("given", ["../secret.jpg", "imgs/../../secret.jpg", "ABSOLUTE"])
def test_media_path_leaving_the_media_root_is_refused_unless_allowed(tmp_path, given):
    media = tmp_path / "media"
    (media / "imgs").mkdir(parents=True)
    secret = tmp_path / "secret.jpg"
    secret.touch()
    given = str(secret) if given == "ABSOLUTE" else given
    p = media / "d.jsonl"
    p.write_text(json.dumps({"id": "x", "image": given, "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}]}) + "\n")
    with pytest.raises(MediaError, match=r"d.jsonl:1 \[id x\]: image path .* resolves outside media_root "
                                         r".*Fix: .*data.allow_media_outside_root=true"):
        read_records(p)[0]
    assert read_records(p, allow_outside_root=True)[0].images == (media / given if given[0] != "/" else secret,)


def test_media_under_a_symlinked_folder_stays_inside_the_root(tmp_path):
    elsewhere = tmp_path / "other_disk"
    elsewhere.mkdir()
    (elsewhere / "a.jpg").touch()
    media = tmp_path / "media"
    media.mkdir()
    (media / "imgs").symlink_to(elsewhere)
    p = media / "d.jsonl"
    p.write_text(json.dumps({"id": "x", "image": "imgs/a.jpg", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}]}) + "\n")
    assert read_records(p)[0].images == (media / "imgs" / "a.jpg",)


def test_text_only_record_has_no_media(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([GOOD]))
    rec = RecordFile(p)[0]
    assert not rec.has_media() and rec.video_clip is None


def test_id_filter(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [dict(GOOD, id=f"x{i}") for i in range(5)]
    rows.append({k: v for k, v in GOOD.items() if k != "id"})  # default id d:6
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = tmp_path / "ids.txt"
    ids.write_text("# kept ids\n\nx3\n  x1  \nd:6\nnot-there\n#x4\n")
    assert read_id_filter(ids) == {"x3", "x1", "d:6", "not-there"}
    rf = read_records(p, ids_file=ids)
    assert [r.id for r in rf] == ["x1", "x3", "d:6"]
    assert [rf.location(i)[1] for i in range(3)] == [2, 4, 6]
    assert rf.missing_ids == {"not-there"}
    assert read_records(p).missing_ids == set()

    ids.write_text("nope\n")
    with pytest.raises(DataError, match="none of the 1 ids"):
        read_records(p, ids_file=ids)


def test_id_filter_file_problems(tmp_path):
    empty = tmp_path / "ids.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(DataError, match=r"ids.txt: id filter file lists no ids\. Fix: write one"):
        read_id_filter(empty)
    with pytest.raises(DataError, match="id filter file not found"):
        read_id_filter(tmp_path / "missing.txt")
    hashes = tmp_path / "h.txt"
    hashes.write_text("clip#0\n")
    assert read_id_filter(hashes) == {"clip#0"}


def test_missing_dataset_file(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        RecordFile(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        RecordFile(tmp_path)


def test_unterminated_string_in_array(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"id": "a", "conversations": [{"from": "human", "value": "oops}]}]')
    with pytest.raises(DataError, match=r"d.json:2: file ends inside a string"):
        RecordFile(p)


def random_value(rng: random.Random, depth: int) -> object:
    kind = rng.randrange(7 if depth < 5 else 4)
    if kind == 0:
        return rng.choice(TRICKY) + rng.choice(["", "\\", '"', "]}", "\\\\\"["])
    if kind == 1:
        return rng.choice([0, -1.5e3, 7, True, False, None])
    if kind == 2:
        return rng.choice(["", "x", "é"])
    if kind == 3:
        return "s" * rng.randrange(50)
    if kind in (4, 5):
        return {f"k{j}{rng.choice(TRICKY)}": random_value(rng, depth + 1)
                for j in range(rng.randrange(4))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


@pytest.mark.parametrize("seed", range(12))
def test_scanner_matches_json_on_random_documents(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    monkeypatch.setattr(record_index, "_CHUNK_BYTES", rng.randrange(1, 80))
    elems = [random_value(rng, 1) for _ in range(rng.randrange(1, 25))]
    p = tmp_path / "r.json"
    p.write_text(json.dumps(elems, indent=rng.choice([None, 1, 4]),
                            ensure_ascii=rng.random() < 0.5), encoding="utf-8")
    index = records.RecordIndex(p)
    assert [index.load(i) for i in range(len(index))] == elems
