"""Convert ProAssist-style streaming dialogs into LLaVA JSONL records.

Input (JSON array or JSONL), one dialog per record::

    {"video_uid": "abc", "video": "videos/abc.mp4", "conversation": [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "frames", "start": 0.0, "end": 4.0},
      {"role": "user", "content": "What should I do next?", "time": 4.0},
      {"role": "assistant", "content": "Pick up the knife.", "time": 4.5},
      {"role": "frames", "start": 4.5, "end": 9.0},
      {"role": "assistant", "content": "Now cut the tomato.", "time": 9.0}]}

Output, one record per dialog (or per window of at most ``max_turns`` assistant turns,
id suffixed ``#0``, ``#1``, ...)::

    {"id": "abc", "video": "videos/abc.mp4", "video_clip": [0.0, 9.0], "conversations": [
      {"from": "system", "value": "You are a helpful assistant."},
      {"from": "human", "value": "<video>\\n[t=4.0s] What should I do next?"},
      {"from": "gpt", "value": "[t=4.5s] Pick up the knife."},
      {"from": "human", "value": "[t=4.5s-9.0s] (watching)"},
      {"from": "gpt", "value": "[t=9.0s] Now cut the tomato."}]}

Rules: system contents are merged into one leading system turn; user and assistant
turns get a ``[t=<time>s]`` tag; consecutive same-side turns are merged with a newline;
an assistant turn not preceded by a user turn (first in the window, or after frames that
followed an assistant turn) gets a human "(watching)" turn tagged with those frames'
span, so human and gpt alternate. The clip spans the window's frames (first start to
last end; the turn times when a window has no frames, or no clip if they span no time).
Turns and frames after the last assistant turn carry no target and are dropped. The video path is copied as given: pass the
matching ``media_root`` when reading the output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpc_train.data.sources.records import RecordIndex
from hpc_train.errors import DataError

_ROLES = ("system", "frames", "user", "assistant")
_DIALOG_FIX = ('each dialog is {"video_uid": ..., "video": "path.mp4", "conversation": '
               '[{"role": "frames", "start": s, "end": e}, {"role": "user" | "assistant", '
               '"content": "...", "time": t}, ...]}')


@dataclass(frozen=True)
class _Event:
    kind: str  # "frames" | "user" | "assistant"
    start: float
    end: float
    text: str = ""


def _fmt(t: float) -> str:
    # Up to 2 decimals but always at least one, so tags read "4.0s", "4.25s".
    s = f"{t:.2f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def convert_dialog(dialog: object, max_turns: int | None = None, *,
                   path: str | Path | None = None, line: int | None = None,
                   fallback_id: str | None = None) -> list[dict]:
    """LLaVA records (as dicts) for one ProAssist dialog; bad input raises DataError."""
    rid = fallback_id

    def fail(problem: str, fix: str = _DIALOG_FIX) -> DataError:
        return DataError(problem, path=path, line=line, record_id=rid, fix=fix)

    if not isinstance(dialog, dict):
        raise fail(f"dialog is not a JSON object (got {type(dialog).__name__})")
    uid = dialog.get("video_uid")
    if isinstance(uid, bool) or not isinstance(uid, str | int) or uid == "":
        raise fail(f"dialog has no usable 'video_uid' (got {uid!r})",
                   'add "video_uid": "<unique id>" to the dialog')
    rid = str(uid)
    video = dialog.get("video")
    if not isinstance(video, str) or not video:
        raise fail(f"dialog has no 'video' path (got {video!r})",
                   'add "video": "path/to/video.mp4" to the dialog')
    conv = dialog.get("conversation")
    if not isinstance(conv, list) or not conv:
        raise fail("'conversation' must be a non-empty list")

    system: list[str] = []
    events: list[_Event] = []
    for k, turn in enumerate(conv):
        read = _read_turn(turn, f"conversation[{k}]", fail)
        if isinstance(read, str):
            system.append(read)
        else:
            events.append(read)
    last = max((k for k, ev in enumerate(events) if ev.kind == "assistant"), default=-1)
    if last == -1:
        raise fail("dialog has no assistant turn, so there is nothing to train on",
                   "add at least one {\"role\": \"assistant\", ...} turn, or drop the dialog")
    # Turns and frames after the final assistant turn have no target: dropped.
    windows = _windows(events[:last + 1], max_turns)
    records = []
    for k, window in enumerate(windows):
        record: dict = {"id": f"{rid}#{k}" if max_turns is not None else rid, "video": video}
        clip = _clip(window)
        if clip is not None:
            record["video_clip"] = list(clip)
        record["conversations"] = _turns(system, window)
        records.append(record)
    return records


def _read_turn(turn: object, where: str, fail: Callable[..., DataError]) -> _Event | str:
    """A dialog turn as an event in time, or a system turn's text."""
    if not isinstance(turn, dict):
        raise fail(f"{where} is not an object")
    role = turn.get("role")
    if role not in _ROLES:
        raise fail(f"{where} has unknown role {role!r}; valid roles: {', '.join(_ROLES)}",
                   f"set 'role' to one of: {', '.join(_ROLES)}")
    if role == "frames":
        start, end = turn.get("start"), turn.get("end")
        if not (_number(start) and _number(end) and 0 <= start <= end):
            raise fail(f"{where} frames need numeric 'start' <= 'end' >= 0 "
                       f"(got start={start!r}, end={end!r})",
                       'write {"role": "frames", "start": 0.0, "end": 4.0}')
        return _Event("frames", float(start), float(end))
    content = turn.get("content")
    if not isinstance(content, str) or not content.strip():
        raise fail(f"{where} ({role}) has no text 'content'",
                   "give the turn a non-empty string 'content', or remove it")
    if role == "system":
        return content
    t = turn.get("time")
    if not _number(t) or t < 0:
        raise fail(f"{where} ({role}) needs a numeric 'time' >= 0 (got {t!r})",
                   'add "time": <seconds into the video> to the turn')
    return _Event(role, float(t), float(t), content)


def _windows(events: list[_Event], max_turns: int | None) -> list[list[_Event]]:
    """The events cut into windows of at most ``max_turns`` assistant turns (one window: all)."""
    limit = max_turns if max_turns is not None else len(events)
    windows: list[list[_Event]] = [[]]
    n_assistant = 0
    for ev in events:
        if n_assistant == limit:
            windows.append([])
            n_assistant = 0
        windows[-1].append(ev)
        n_assistant += ev.kind == "assistant"
    return windows


def _clip(window: list[_Event]) -> tuple[float, float] | None:
    frames = [ev for ev in window if ev.kind == "frames"]
    spans = frames or window
    start = min(ev.start for ev in spans)
    end = max(ev.end for ev in spans)
    return (start, end) if end > start else None


def _turns(system: list[str], window: list[_Event]) -> list[dict]:
    turns: list[tuple[str, list[str]]] = []
    pending: list[_Event] = []  # frames since the last emitted turn
    for ev in window:
        if ev.kind == "frames":
            pending.append(ev)
            continue
        side = "human" if ev.kind == "user" else "gpt"
        if side == "gpt" and (not turns or (turns[-1][0] == "gpt" and pending)):
            if pending:
                tag = f"[t={_fmt(pending[0].start)}s-{_fmt(pending[-1].end)}s]"
            else:
                tag = f"[t={_fmt(ev.start)}s]"
            turns.append(("human", [f"{tag} (watching)"]))
        text = f"[t={_fmt(ev.start)}s] {ev.text}"
        if turns and turns[-1][0] == side:
            turns[-1][1].append(text)
        else:
            turns.append((side, [text]))
        pending = []
    out = [{"from": "system", "value": "\n".join(system)}] if system else []
    for k, (side, parts) in enumerate(turns):
        value = "\n".join(parts)
        out.append({"from": side, "value": "<video>\n" + value if k == 0 else value})
    return out


def convert_proassist(in_path: str | Path, out_path: str | Path,
                      max_turns: int | None = None) -> int:
    """Convert a ProAssist JSON/JSONL file to LLaVA JSONL; returns the records written.

    The output appears atomically (temp file then rename); on error it is left untouched.
    """
    if max_turns is not None and (isinstance(max_turns, bool) or max_turns < 1):
        raise ValueError(f"max_turns must be an integer >= 1 or None, got {max_turns!r}")
    index = RecordIndex(in_path)
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    written = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(len(index)):
                records = convert_dialog(index.load(i, id_key="video_uid"), max_turns,
                                         path=index.path,
                                         line=index.line(i), fallback_id=index.default_id(i))
                for rec in records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                written += len(records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


__all__ = ["convert_dialog", "convert_proassist"]
