"""Our own generator of broken LLaVA-style datasets, for the check-data fuzz test.

Record families turn valid records into JSON lines (mutated fields, confused types, extreme
sizes and numbers, deep nesting); file families turn a few valid lines into whole files (foreign
encodings, line endings, binary). Every case comes from a seeded ``random.Random``, so a failing
case is reproduced by its family, seed and index.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import random
import zipfile
from collections.abc import Callable

CONTROL_TOKENS = ("<end_of_utterance>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
                  "<fake_token_around_image>", "<row_1_col_1>", "<global-img>")
PLACEHOLDERS = ("<image>", "<video>", "<speech>", "<audio>")
BAD_PATHS = ("missing.jpg", "../../etc/passwd", "/etc/hosts", "a" * 5000, "x\x00y.jpg", "~nobody-here/x.jpg",
             "", "media", ".", "/", "media/" + "d/" * 400 + "x.jpg", "\udcff.jpg", "train.jsonl")
ODD_CLIPS = ([1e308, 1e309], [0, 1e308], [1e308, 1e308], [-1, 2], [3, 1], [0, 0], ["0", 1], [0], [0, 1, 2],
             {"a": 1}, [float("nan"), 1], [0, float("inf")], [True, 2], [None, None], [-0.0, 1e-320])
ODD_VALUES = (None, True, False, 0, -1, 3.5, 1e308, "", "text", [], [1, 2], {}, {"from": "gpt"}, [[["x"]]],
              "<image>", -0.0)
BIG = "__BIG_NUMBER__"


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path inside a record (containers and leaves)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for k, item in enumerate(value):
            found += _paths(item, prefix + (k,))
    return found


def _set(record: dict, path: tuple, value: object) -> None:
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _delete(record: dict, path: tuple) -> None:
    target = record
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


def _texts(record: dict) -> list[dict]:
    turns = record.get("conversations")
    return [t for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []


def _drop_a_field(record: dict, turns: list[dict], rng: random.Random) -> None:
    if paths := _paths(record):
        _delete(record, rng.choice(paths))


def _odd_role(record: dict, turns: list[dict], rng: random.Random) -> None:
    if turns:
        rng.choice(turns)["from"] = rng.choice(["gpt", "human", "system", "bot", "", "GPT", None, 7])


def _extra_placeholder(record: dict, turns: list[dict], rng: random.Random) -> None:
    if turns:
        turn = rng.choice(turns)
        turn["value"] = str(turn.get("value", "")) + rng.choice(PLACEHOLDERS)


def _bad_media_path(record: dict, turns: list[dict], rng: random.Random) -> None:
    """A bad path where the record has media, so the placeholders still match."""
    kind = rng.choice([k for k in ("image", "video", "audio") if k in record] or ["image"])
    given = record.get(kind)
    if isinstance(given, list):
        record[kind] = [rng.choice(BAD_PATHS) for _ in given]
        return
    record[kind] = rng.choice(BAD_PATHS)
    if given is None and turns and isinstance(turns[0].get("value"), str):
        turns[0]["value"] = "<image>" + turns[0]["value"]


def _odd_clip(record: dict, turns: list[dict], rng: random.Random) -> None:
    record["video_clip"] = copy.deepcopy(rng.choice(ODD_CLIPS))


def _odd_id(record: dict, turns: list[dict], rng: random.Random) -> None:
    record["id"] = rng.choice(["", "   ", "dup", "dup", 10**50, 1.5, True, [], {}, "\n", "id\x00"])


def _control_token(record: dict, turns: list[dict], rng: random.Random) -> None:
    if turns:
        turn = rng.choice(turns)
        turn["value"] = f"{turn.get('value', '')} {rng.choice(CONTROL_TOKENS)} tail"


def _empty_answers(record: dict, turns: list[dict], rng: random.Random) -> None:
    for turn in turns:
        if turn.get("from") == "gpt":
            turn["value"] = rng.choice(["", "   ", "\n"])


def _reshaped_conversation(record: dict, turns: list[dict], rng: random.Random) -> None:
    if isinstance(record.get("conversations"), list):
        conv = record["conversations"]
        record["conversations"] = rng.choice([conv[::-1], conv * 50, conv[:1], [], conv + conv[:1]])


def _renamed_key(record: dict, turns: list[dict], rng: random.Random) -> None:
    if not (paths := _paths(record)):
        return
    old = rng.choice(paths)
    parent = record
    for key in old[:-1]:
        parent = parent[key]
    if isinstance(parent, dict):
        parent[rng.choice(["conversation", "Id", "images", "from ", "value\u200b"])] = parent.pop(old[-1])


MUTATIONS = (_drop_a_field, _odd_role, _extra_placeholder, _bad_media_path, _odd_clip, _odd_id, _control_token,
             _empty_answers, _reshaped_conversation, _renamed_key)


def mutated_valid(base: list[dict], rng: random.Random) -> str:
    record = copy.deepcopy(rng.choice(base))
    for _ in range(rng.randint(1, 3)):
        MUTATIONS[rng.randrange(len(MUTATIONS))](record, _texts(record), rng)
    return json.dumps(record)


def type_confusion(base: list[dict], rng: random.Random) -> str:
    record = copy.deepcopy(rng.choice(base))
    for _ in range(rng.randint(1, 2)):
        paths = _paths(record)
        if paths:
            _set(record, rng.choice(paths), copy.deepcopy(rng.choice(ODD_VALUES)))
    return json.dumps(record)


def extreme_values(base: list[dict], rng: random.Random) -> str:
    record = copy.deepcopy(rng.choice(base))
    turns = _texts(record)
    op = rng.randrange(7)
    if op == 0:  # an integer of thousands of digits: Python's int parser refuses it
        paths = _paths(record)
        _set(record, rng.choice(paths) if paths else ("id",), BIG)
        return json.dumps(record).replace(f'"{BIG}"', "9" * rng.randint(4301, 8000))
    if op == 1:
        record["video_clip"] = [rng.choice([0, 1e-320, 1e308]), rng.choice([1e308, 1e300, 2**63, 10**30])]
    elif op == 2 and turns:
        rng.choice(turns)["value"] = rng.choice(["x ", "é", "🙂", "<image>"]) * rng.randint(20_000, 60_000)
    elif op == 3:
        record["id"] = "i" * rng.randint(10_000, 100_000)
    elif op == 4:
        record["conversations"] = [{"from": "human" if k % 2 == 0 else "gpt", "value": f"t{k}"}
                                   for k in range(rng.randint(500, 3000))]
    elif op == 5:
        record["image"] = ["missing.jpg"] * rng.randint(1000, 5000)
    else:
        text = rng.choice(["\ud800", "\u202e\u0301\u0301", "\x07\x1b[31m", "\ufeff", "\U0010ffff"])
        if turns:
            rng.choice(turns)["value"] += text
    return json.dumps(record)


def deep_nesting(base: list[dict], rng: random.Random) -> str:
    record = copy.deepcopy(rng.choice(base))
    depth = rng.choice([50, 500, 990, 1000, 1100, 5000, 100_000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    paths = _paths(record)
    where = rng.choice(paths) if paths and rng.random() < 0.8 else ("extra",)
    _set(record, where, BIG)
    return json.dumps(record).replace(f'"{BIG}"', opener * depth + "1" + closer * depth)


RECORD_FAMILIES: dict[str, Callable[[list[dict], random.Random], str]] = {
    "mutated_valid": mutated_valid, "type_confusion": type_confusion,
    "extreme_values": extreme_values, "deep_nesting": deep_nesting,
}


def _lines(base: list[dict], rng: random.Random) -> list[str]:
    return [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in rng.sample(base, rng.randint(1, 3))]


def encodings(base: list[dict], rng: random.Random) -> bytes:
    lines = _lines(base, rng)
    for k in range(len(lines)):
        lines[k] = lines[k].replace('"value": "', '"value": "é ', 1)
    text = "\n".join(lines) + "\n" if rng.random() < 0.5 else "[" + ",\n".join(lines) + "]\n"
    op = rng.randrange(9)
    codec = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "latin-1", "cp1252", "utf-8-sig"]
    if op < len(codec):
        return text.encode(codec[op])
    raw = bytearray(text.encode())
    at = rng.randrange(len(raw))
    raw[at:at] = rng.choice([b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x00", b"\x80"])
    return bytes(raw)


def line_endings(base: list[dict], rng: random.Random) -> bytes:
    lines = _lines(base, rng)
    sep = rng.choice(["\r\n", "\r", "\n\r", "\n\n\n", "\u2028", "\x0c", "\x0b", " \n", "\r\r\n"])
    if rng.random() < 0.3:  # a pretty-printed JSON array with the same separator
        text = json.dumps([json.loads(x) for x in lines], indent=rng.choice([1, 2])).replace("\n", sep)
    else:
        text = sep.join(lines) + rng.choice(["", sep, "\n" * 1000])
    return text.encode()


def binary(base: list[dict], rng: random.Random) -> bytes:
    valid = ("\n".join(_lines(base, rng)) + "\n").encode()
    op = rng.randrange(7)
    if op == 0:
        return rng.randbytes(rng.randint(0, 5000))
    if op == 1:
        return gzip.compress(valid)
    if op == 2:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("train.jsonl", valid)
        return buf.getvalue()
    if op == 3:
        return b"\x89PNG\r\n\x1a\n" + rng.randbytes(200)
    if op == 4:
        at = rng.randrange(len(valid))
        return valid[:at] + rng.randbytes(rng.randint(1, 64)) + valid[at:]
    if op == 5:
        return valid[: rng.randrange(len(valid))]
    return b"[" + valid.replace(b"\n", b",")[: rng.randrange(1, len(valid))]


FILE_FAMILIES: dict[str, Callable[[list[dict], random.Random], bytes]] = {
    "encodings": encodings, "line_endings": line_endings, "binary": binary,
}
