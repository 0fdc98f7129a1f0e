"""LLaVA-style dataset records, read lazily from JSON-array or JSONL files.

A record looks like::

    {"id": "r1", "image": "imgs/a.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

``image``, ``video`` and ``audio`` are a path or a list of paths; relative paths resolve
against ``media_root`` (default: the dataset file's folder), and a path that leaves it
(``../``, absolute) is refused unless ``allow_outside_root`` is set, so a dataset cannot
make a job read any file it can reach. ``video_clip: [start_s,
end_s]`` optionally restricts the video(s) to a time window; ``references: ["...", ...]``
lists other correct answers to the last question, which evaluation scores against too.
Without an ``id`` the record gets ``"<file stem>:<line>"``.

The format (JSON array or JSONL) is detected from the first non-blank byte, not the file
extension. Files are never loaded whole: one streaming pass (:mod:`hpc_train.data.sources.record_index`)
records each record's byte span and line, and a record is parsed and validated only when it is accessed, so every
error names the file, the line, the record id and a fix.

Placeholders: each ``<image>`` / ``<video>`` / ``<speech>`` in the turns stands for one
file of that kind, in order; counts must match the files given, and placeholders may
only appear in user or system turns. ``<audio>`` is accepted as an alias of
``<speech>``. LLaVA-Video convention: a record with video(s), no images, no ``<video>``
placeholder and exactly as many ``<image>`` placeholders as videos has those
``<image>`` rewritten to ``<video>`` (LLaVA-Video data marks videos with ``<image>``).
"""

from __future__ import annotations

import collections.abc
import operator
import os
from dataclasses import dataclass
from pathlib import Path

from hpc_train.data.sources.record_fields import Fail, read_references, video_clip
from hpc_train.data.sources.record_fields import json_type as _json_type
from hpc_train.data.sources.record_fields import shown as _shown
from hpc_train.data.sources.record_index import RecordIndex
from hpc_train.errors import DataError, MediaError

ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
RECORD_KINDS = ("image", "video", "audio", "multi_image", "text")
"""What :attr:`Record.kind` can be."""
PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<speech>"}
_ALIASES = {"<audio>": "<speech>"}



@dataclass(frozen=True)
class Turn:
    """One conversation turn; ``role`` is "system", "user" or "assistant"."""

    role: str
    text: str


@dataclass(frozen=True)
class Record:
    """One validated training sample with media paths resolved."""

    id: str
    turns: tuple[Turn, ...]
    images: tuple[Path, ...]
    videos: tuple[Path, ...]
    audios: tuple[Path, ...]
    source: Path
    line: int
    video_clip: tuple[float, float] | None = None
    references: tuple[str, ...] = ()
    """Other correct answers to the last question (evaluation scores against all of them)."""

    @property
    def where(self) -> str:
        """``file:line [id ...]``, as every message about a record starts."""
        return f"{self.source}:{self.line} [id {self.id}]"

    def has_media(self) -> bool:
        """True when the record refers to at least one image, video or audio file."""
        return bool(self.images or self.videos or self.audios)

    @property
    def kind(self) -> str:
        """``video``, ``audio``, ``multi_image``, ``image`` or ``text`` (for audits and tests)."""
        if self.videos:
            return "video"
        if self.audios:
            return "audio"
        if len(self.images) > 1:
            return "multi_image"
        return "image" if self.images else "text"


class RecordFile(collections.abc.Sequence[Record]):
    """Indexed reader of one LLaVA-style dataset file (JSON array or JSONL, auto-detected by content, not extension).

    ``ids`` keeps only records with those ids; ids not found are in ``missing_ids``.
    """

    def __init__(self, path: str | Path, media_root: str | Path | None = None,
                 ids: set[str] | None = None, check_media_exists: bool = True,
                 media_root_note: str | None = None, allow_outside_root: bool = False) -> None:
        """``media_root_note``: where ``media_root`` came from, when that may explain a missing
        file (a recipe's media folder kept while the dataset was overridden).
        ``allow_outside_root``: accept media paths that resolve outside ``media_root``."""
        self._index = RecordIndex(path)
        self.path = self._index.path
        self.format = self._index.format
        root = Path(media_root).expanduser() if media_root is not None else self.path.parent
        self.media_root = Path(os.path.normpath(root.absolute()))
        self.check_media_exists = check_media_exists
        self.media_root_note = media_root_note
        self.allow_outside_root = allow_outside_root
        self.missing_ids: set[str] = set()
        if ids is not None:
            self._filter(ids)

    def _filter(self, ids: set[str]) -> None:
        # One json.loads per record during indexing; only the positions are kept.
        keep: list[int] = []
        found: set[str] = set()
        for i in range(len(self._index)):
            obj = self._index.load(i)
            rid = _record_id(obj, self._index, i) if isinstance(obj, dict) else None
            if rid is None:
                rid = self._index.default_id(i)
            if rid in ids:
                keep.append(i)
                found.add(rid)
        self.missing_ids = ids - found
        if not keep:
            raise DataError(
                f"none of the {len(ids)} ids in the id filter occur in this file",
                path=self.path, fix="check that the ids file belongs to this dataset (one id "
                                    "per line, exactly as in the records' \"id\" field)")
        self._index.keep_only(keep)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        try:
            i = operator.index(i)  # samplers may hand out numpy integers
        except TypeError:
            raise TypeError(f"RecordFile indices must be integers, not {type(i).__name__}"
                            ) from None
        n = len(self._index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record index {i} out of range for {n} records")
        obj = self._index.load(i)
        line = self._index.line(i)
        if not isinstance(obj, dict):
            raise DataError(
                f"record is not a JSON object (got {_json_type(obj)})", path=self.path,
                line=line, record_id=self._index.default_id(i),
                fix='each record must be an object like {"id": ..., "conversations": [...]}')
        rid = _record_id(obj, self._index, i)
        return _parse(obj, rid=rid, path=self.path, line=line, media_root=self.media_root,
                      check_exists=self.check_media_exists, media_root_note=self.media_root_note,
                      allow_outside_root=self.allow_outside_root)

    def location(self, i: int) -> tuple[Path, int]:
        """(file, line) of record ``i`` without parsing it."""
        return self.path, self._index.line(i)


def _record_id(obj: dict, index: RecordIndex, i: int) -> str:
    rid = obj.get("id")
    if rid is None:
        return index.default_id(i)
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise DataError(f"'id' must be a string (got {_json_type(rid)})", path=index.path,
                        line=index.line(i), record_id=index.default_id(i),
                        fix='write the id as a string, e.g. "id": "sample-0001"')
    if isinstance(rid, str) and not rid.strip():
        raise DataError("'id' is empty", path=index.path, line=index.line(i), record_id=index.default_id(i),
                        fix='give the record a unique id, e.g. "id": "sample-0001" (or drop the key for '
                            'the default <file>:<line>)')
    return str(rid)


FIX_MISSING_MEDIA = ("check media_root (relative media paths resolve against it; default: the dataset file's "
                     "folder) and the path in the record")
FIX_MIXED_MEDIA_ROOT = ("set data.media_root to the folder this dataset's media paths are relative to, or "
                        "data.media_root=null for the dataset file's folder")


FIX_OUTSIDE_ROOT = ("write the path relative to media_root (or move the file under it); to read media from "
                    "anywhere, set data.allow_media_outside_root=true")


_TURN_FIX = 'each turn is {"from": "human" | "gpt" | "system", "value": "<text>"}'


def _parse(obj: dict, *, rid: str, path: Path, line: int, media_root: Path,
           check_exists: bool, media_root_note: str | None = None, allow_outside_root: bool = False) -> Record:
    """Validate one record object and build a Record."""

    def fail(problem: str, fix: str, error: type[DataError] = DataError) -> DataError:
        return error(problem, path=path, line=line, record_id=rid, fix=fix)

    roles, texts = _read_turns(obj.get("conversations"), fail)
    media = {kind: _media_list(obj, kind, fail) for kind in PLACEHOLDERS}
    if (media["video"] and not media["image"] and not any("<video>" in t for t in texts)
            and sum(t.count("<image>") for t in texts) == len(media["video"])):
        texts = [t.replace("<image>", "<video>") for t in texts]
    _check_placeholders(roles, texts, media, fail)
    clip = video_clip(obj, bool(media["video"]), fail)
    resolved = {kind: tuple(_media_path(p, kind, media_root, fail, check_exists=check_exists,
                                        allow_outside_root=allow_outside_root, root_note=media_root_note)
                            for p in paths)
                for kind, paths in media.items()}
    turns = tuple(Turn(role, text) for role, text in zip(roles, texts, strict=True))
    return Record(id=rid, turns=turns, images=resolved["image"], videos=resolved["video"],
                  audios=resolved["audio"], source=path, line=line, video_clip=clip,
                  references=read_references(obj, fail))


def _read_turns(conv: object, fail: Fail) -> tuple[list[str], list[str]]:
    """Roles (``system`` / ``user`` / ``assistant``) and texts of a record's conversation, with at
    least one non-empty assistant turn."""
    if conv is None:
        raise fail("record has no 'conversations'",
                   "add a 'conversations' list of turns, e.g. [{\"from\": \"human\", "
                   "\"value\": \"...\"}, {\"from\": \"gpt\", \"value\": \"...\"}]")
    if not isinstance(conv, list):
        raise fail(f"'conversations' must be a list of turns (got {_json_type(conv)})", _TURN_FIX)
    if not conv:
        raise fail("'conversations' is empty",
                   "add at least one human turn and one gpt turn, or remove the record")
    turns = [_read_turn(turn, f"conversations[{k}]", fail) for k, turn in enumerate(conv)]
    roles, texts = [role for role, _ in turns], [text for _, text in turns]
    if "assistant" not in roles:
        raise fail("conversation has no assistant (gpt) turn",
                   "add a {\"from\": \"gpt\", \"value\": \"...\"} turn with the target answer")
    for k, (role, text) in enumerate(turns):
        if role == "assistant" and not text.strip():
            raise fail(f"conversations[{k}] is an assistant turn with empty text",
                       "write the target answer in the turn, or remove the turn")
    return roles, texts


def _read_turn(turn: object, where: str, fail: Fail) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise fail(f"{where} is {_json_type(turn)}, not a turn object", _TURN_FIX)
    for key in ("from", "value"):
        if key not in turn:
            raise fail(f"{where} has no '{key}'", f"add '{key}' to the turn; {_TURN_FIX}")
    who, text = turn["from"], turn["value"]
    if not isinstance(who, str) or who not in ROLES:
        valid_roles = ", ".join(sorted(ROLES))
        raise fail(f"{where} has unknown role {_shown(who)}; valid roles: {valid_roles}",
                   f"set 'from' to one of: {valid_roles}")
    if not isinstance(text, str):
        raise fail(f"{where} 'value' must be a string (got {_json_type(text)})",
                   "write the turn text as a JSON string")
    for alias, canonical in _ALIASES.items():
        text = text.replace(alias, canonical)
    return ROLES[who], text


def _check_placeholders(roles: list[str], texts: list[str], media: dict[str, list[str]], fail: Fail) -> None:
    """Media placeholders only in user / system turns, one per media file of their kind."""
    for k, (role, text) in enumerate(zip(roles, texts, strict=True)):
        present = [token for token in PLACEHOLDERS.values() if token in text] if role == "assistant" else []
        if present:
            token = present[0]
            raise fail(f"conversations[{k}] is an assistant turn containing "
                       f"{text.count(token)} {token} placeholder(s); media may only "
                       "appear in user or system turns",
                       f"move {token} into the user turn that asks about the media")
    for kind, token in PLACEHOLDERS.items():
        found = sum(t.count(token) for t in texts)
        given = len(media[kind])
        if found != given:
            raise fail(f"found {found} {token} placeholder(s) in the turns but {given} "
                       f"{kind} file(s) in '{kind}'",
                       f"put exactly one {token} in the user turn(s) for each file listed "
                       f"in '{kind}' (or list one file per {token})")


def _media_path(given: str, kind: str, media_root: Path, fail: Fail, *,
                check_exists: bool, allow_outside_root: bool, root_note: str | None) -> Path:
    """The file a record's media path names, refused when it leaves ``media_root``."""
    try:
        full = media_root / Path(given).expanduser()  # an absolute path replaces the root
    except RuntimeError:  # ~user of an unknown user
        raise fail(f"{kind} path {_shown_path(given)} names an unknown home folder", "fix the path in the record",
                   MediaError) from None
    if not allow_outside_root and not Path(os.path.normpath(full)).is_relative_to(media_root):
        # normpath, not resolve: a symlinked media folder (data on another disk) stays inside.
        raise fail(f"{kind} path {_shown_path(given)} resolves outside media_root {media_root}", FIX_OUTSIDE_ROOT,
                   MediaError)
    if check_exists:
        try:
            found = full.exists()
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte
            raise fail(f"{kind} path {_shown_path(given)} cannot be opened ({getattr(exc, 'strerror', None) or exc})",
                       "fix the path in the record", MediaError) from None
        if not found:
            where = f"media_root: {media_root}" + (f"; {root_note}" if root_note else "")
            raise fail(f"{kind} file not found: {_shown_path(full)} ({where})",
                       FIX_MIXED_MEDIA_ROOT if root_note else FIX_MISSING_MEDIA, MediaError)
    return full


def _shown_path(path: str | Path) -> str:
    text = str(path)
    return text if len(text) <= 300 else f"{text[:150]}...{text[-100:]} ({len(text)} characters)"


def _media_list(obj: dict, kind: str, fail: Fail) -> list[str]:
    value = obj.get(kind)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
        raise fail(f"'{kind}' must be a non-empty path string or a list of them "
                   f"(got {_shown(value)})",
                   f'write e.g. "{kind}": "relative/path" or "{kind}": ["a", "b"]')
    return items


def read_id_filter(path: str | Path) -> set[str]:
    """Ids listed one per line; blank lines and lines starting with '#' are ignored."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("id filter file not found", path=p,
                        fix="check the ids_file path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read id filter file ({e})", path=p,
                        fix="make it a readable UTF-8 text file with one id per line") from None
    ids = {s for s in (raw.strip() for raw in text.splitlines()) if s and not s.startswith("#")}
    if not ids:
        raise DataError("id filter file lists no ids", path=p,
                        fix="write one record id per line, or drop the ids_file setting")
    return ids


def read_records(path: str | Path, media_root: str | Path | None = None,
                 ids_file: str | Path | None = None,
                 check_media_exists: bool = True, allow_outside_root: bool = False) -> RecordFile:
    """Open a JSON/JSONL dataset file, optionally keeping only the ids in ``ids_file``."""
    ids = read_id_filter(ids_file) if ids_file is not None else None
    return RecordFile(path, media_root=media_root, ids=ids,
                      check_media_exists=check_media_exists, allow_outside_root=allow_outside_root)


__all__ = ["PLACEHOLDERS", "ROLES", "Record", "RecordFile", "RecordIndex", "Turn",
           "read_id_filter", "read_records"]
