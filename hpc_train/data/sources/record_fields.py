"""A record's optional fields (``video_clip``, ``references``) and the helpers every record
error shares: how a bad value is shown, and the ``fail`` callback that builds the error."""

from __future__ import annotations

import collections.abc
import math
import reprlib

from hpc_train.errors import DataError

Fail = collections.abc.Callable[..., DataError]
"""Builds the error for one record: ``fail(problem, fix[, error type])``."""


def json_type(obj: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(obj), "a value")


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()  # keyword arguments only from Python 3.12
    short.maxlevel, short.maxstring, short.maxother, short.maxlist, short.maxdict = 3, 120, 60, 4, 4
    return short


_REPR = _short_repr()


def shown(value: object) -> str:
    """A value as a message can show it: short, whatever its size or depth."""
    return _REPR.repr(value)


def video_clip(obj: dict, has_video: bool, fail: Fail) -> tuple[float, float] | None:
    clip = obj.get("video_clip")
    if clip is None:
        return None
    fix = 'write "video_clip": [start_seconds, end_seconds] with 0 <= start < end'
    if not has_video:
        raise fail("'video_clip' is set but the record has no 'video'",
                   "add the 'video' the clip refers to, or remove 'video_clip'")
    if (not isinstance(clip, list) or len(clip) != 2
            or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in clip)):
        raise fail(f"'video_clip' must be two numbers [start, end] (got {shown(clip)})", fix)
    try:
        start, end = float(clip[0]), float(clip[1])
    except OverflowError:
        raise fail(f"'video_clip' {shown(clip)} holds a number too large for seconds", fix) from None
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
        raise fail(f"'video_clip' [{start}, {end}] is not a valid time window", fix)
    return start, end


def read_references(obj: dict, fail: Fail) -> tuple[str, ...]:
    """``references``: other correct answers to the last question, e.g. the four other COCO
    captions of an image; evaluation scores a generated answer against all of them."""
    value = obj.get("references")
    if value is None:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(r, str) and r.strip() for r in value):
        raise fail(f"'references' must be a non-empty list of non-empty strings (got {shown(value)})",
                   'write e.g. "references": ["a dog runs on grass", "a brown dog running"], or remove it')
    return tuple(value)
