"""Where each record of a dataset file is: one streaming pass over a JSON array or JSONL file
records every record's byte span and line, so a record is read and parsed only when it is
accessed and every error can name its line.

The format is detected from the first non-blank byte, not the file extension; files in a
foreign encoding (UTF-16 / UTF-32, gzip, zip) are refused by name before any scanning.
"""

from __future__ import annotations

import json
import re
from array import array
from pathlib import Path
from typing import BinaryIO

from hpc_train.errors import DataError

# Read size of the indexing pass; a module constant so tests can force records to
# straddle chunk boundaries.
_CHUNK_BYTES = 1 << 20
# A string token longer than this while indexing is almost surely an unterminated quote;
# stop before the carried buffer grows to the whole file.
_MAX_STRING_BYTES = 256 << 20
_BOM = b"\xef\xbb\xbf"
# Tokens of the JSON-array scanner: a complete string (no raw newline, which JSON
# forbids), a bracket or comma, a bare word (number / true / false / null / garbage), or
# a lone quote = a string not terminated within the current buffer.
_TOKEN = re.compile(rb'"[^"\\\n]*(?:\\.[^"\\\n]*)*"|[\[\]{},]|[^\s"\[\]{},:]+|"')
# Inside a record (depth >= 2): a run of anything but brackets, complete strings included.
_SKIP = re.compile(rb'(?:[^"\[\]{}]+|"[^"\\\n]*(?:\\.[^"\\\n]*)*")*')


def _nested_group(levels: int) -> bytes:
    """Regex for a balanced {...} / [...] nested at most ``levels`` deep, strings included.

    Single-character steps (not runs) keep it free of catastrophic backtracking when a
    record is cut by the buffer end or nests deeper; the scanner then goes bracket by
    bracket.
    """
    string = rb'"[^"\\\n]*(?:\\.[^"\\\n]*)*"'
    body = rb'[^"\[\]{}]|' + string
    group = b""
    for _ in range(levels):
        inner = body + (b"|" + group if group else b"")
        group = rb"(?:\{(?:" + inner + rb")*\}|\[(?:" + inner + rb")*\])"
    return group


# A whole record of usual depth (record > conversations > turn) in one C-level match.
_RECORD = re.compile(_nested_group(3))


class RecordIndex:
    """Byte span and 1-based line of every record of a JSON-array or JSONL file.

    Built in one streaming pass; ``load(i)`` reads and ``json.loads`` one record.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().absolute()
        if not self.path.is_file():
            what = "is a directory" if self.path.is_dir() else "not found"
            raise DataError(f"dataset file {what}", path=self.path,
                            fix="check the dataset path (relative paths resolve against the "
                                "current directory, or the mixture YAML's folder)")
        self.starts = array("q")
        self.ends = array("q")
        self.lines = array("q")
        _refuse_foreign_encoding(self.path)
        first = self._first_byte()
        if first == b"[":
            self.format = "json"
            self._scan_json_array()
        elif first in (b"{", b""):
            self.format = "jsonl"
            self._scan_jsonl()
            if len(self) and _incomplete(self.read(0)):
                # A first line that is valid JSON cut short is almost always a
                # pretty-printed document that is not an array (e.g. one object).
                raise DataError(
                    "line is not a complete JSON record: the file is neither JSONL (one "
                    "record per line) nor a JSON array of records", path=self.path,
                    line=self.lines[0],
                    fix="a JSON dataset must be a top-level array `[{...}, {...}]` (wrap a "
                        "single object in [ ]); a JSONL dataset needs each record on one line")
        else:
            raise DataError(
                f"file is not a JSON array of records nor JSONL (it starts with {first!r})",
                path=self.path, line=1,
                fix="a JSON dataset must be a top-level array of record objects `[{...}, ...]`; "
                    "a JSONL dataset must hold one record object per line")
        if not len(self):
            raise DataError(
                "file has no records", path=self.path,
                fix="add records (a JSON array of objects, or one JSON object per line) or "
                    "point the config at the right dataset file")

    def __len__(self) -> int:
        return len(self.starts)

    def _first_byte(self) -> bytes:
        with open(self.path, "rb") as f:
            head = f.read(len(_BOM))
            data = head[len(_BOM):] if head == _BOM else head
            while True:
                stripped = data.lstrip()
                if stripped:
                    return stripped[:1]
                data = f.read(_CHUNK_BYTES)
                if not data:
                    return b""

    def _scan_jsonl(self) -> None:
        offset = 0
        with open(self.path, "rb") as f:
            # Binary line iteration reads in buffered chunks; only one line is held at a time.
            for lineno, raw in enumerate(f, start=1):
                start = offset
                if lineno == 1 and raw.startswith(_BOM):
                    start += len(_BOM)
                offset += len(raw)
                if raw.strip():
                    self.starts.append(start)
                    self.ends.append(offset)
                    self.lines.append(lineno)

    def _scan_json_array(self) -> None:
        """Find each top-level element of ``[ ... ]`` by tracking strings and bracket depth."""
        with open(self.path, "rb") as f:
            _ArrayScan(self).run(f)

    def _add(self, start: int, end: int, line: int) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.lines.append(line)

    def _error(self, problem: str, line: int, fix: str) -> DataError:
        return DataError(problem, path=self.path, line=line, fix=fix)

    def line(self, i: int) -> int:
        """1-based line where record ``i`` starts."""
        return self.lines[i]

    def read(self, i: int) -> bytes:
        """Raw bytes of record ``i``."""
        start, end = self.starts[i], self.ends[i]
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        if len(data) != end - start:
            raise DataError("file is shorter than when it was indexed", path=self.path,
                            line=self.lines[i],
                            fix="do not modify dataset files while they are being read")
        return data

    def default_id(self, i: int) -> str:
        """Id of a record without one: ``<file stem>:<line>``."""
        return f"{self.path.stem}:{self.lines[i]}"

    def load(self, i: int, id_key: str = "id") -> object:
        """Parse record ``i``; malformed JSON raises DataError at the exact line and column.

        ``id_key`` names the field a malformed record's error message takes its id from.
        """
        data = self.read(i)
        line = self.lines[i]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"record is not valid UTF-8 (byte {e.start} of the record)",
                            path=self.path, line=line, record_id=self.default_id(i),
                            fix="re-save the file as UTF-8") from None
        try:
            return json.loads(text)
        except RecursionError:
            raise DataError("record nests arrays / objects too deeply to parse (about 1000 levels)",
                            path=self.path, line=line, record_id=self.default_id(i),
                            fix="flatten the record: a record holds a few levels (record > conversations > turn)"
                            ) from None
        except json.JSONDecodeError as e:
            if self.format == "jsonl" and e.msg == "Extra data" and "\r" in text.rstrip("\r\n"):
                raise DataError("records are separated by bare carriage returns (CR, old Mac line endings), "
                                "so the file reads as one line", path=self.path, line=line,
                                record_id=self.default_id(i),
                                fix="convert the line endings to LF, e.g. `tr '\\r' '\\n' < IN > OUT`") from None
            # Best-effort id of the broken record, so the message can still name it.
            m = re.search(rf'"{re.escape(id_key)}"\s*:\s*(?:"((?:[^"\\]|\\.)*)"|(-?\d+))', text)
            rid = (m.group(1) or m.group(2)) if m else self.default_id(i)
            col = e.colno + (self._column_of(self.starts[i]) if e.lineno == 1 else 0)
            if self.format == "jsonl" and e.lineno > 1:
                # Only the line's own newline can be past line 1: the line ended early.
                col = len(text.rstrip("\r\n")) + 1
            if self.format == "jsonl":
                fix = (f"make line {line} one complete JSON object (JSONL holds one record "
                       "per line; check quotes, commas and brackets)")
            else:
                fix = "fix the JSON syntax of this record (check quotes, commas and brackets)"
            msg = e.msg.removesuffix(" at")  # json says "Invalid control character at"
            raise DataError(f"malformed JSON: {msg} (column {col})", path=self.path,
                            line=line + (e.lineno - 1 if self.format == "json" else 0),
                            record_id=rid, fix=fix) from None
        except ValueError as e:  # Python's limit on integer digits (4300)
            raise DataError(f"record holds a number Python cannot read ({e})", path=self.path, line=line,
                            record_id=self.default_id(i),
                            fix="write the number with fewer digits (or as a string)") from None

    def _column_of(self, offset: int) -> int:
        """0-based character column of a file offset (only computed for error messages)."""
        lookback = min(offset, 1 << 16)
        with open(self.path, "rb") as f:
            f.seek(offset - lookback)
            before = f.read(lookback)
        nl = before.rfind(b"\n")
        if nl == -1 and lookback < offset:
            return 0  # line too long to look back over; column is relative to the record
        prefix = before[nl + 1:]
        if prefix.startswith(_BOM):
            prefix = prefix[len(_BOM):]
        return len(prefix.decode("utf-8", errors="replace"))

    def keep_only(self, positions: list[int]) -> None:
        """Restrict the index to the given record positions (in that order)."""
        self.starts = array("q", (self.starts[p] for p in positions))
        self.ends = array("q", (self.ends[p] for p in positions))
        self.lines = array("q", (self.lines[p] for p in positions))


class _ArrayScan:
    """One streaming pass over a JSON array file: where each top-level element starts and ends.

    Reads in chunks of ``_CHUNK_BYTES``; a string cut by a chunk's end is carried into the next.
    Line numbers are counted lazily, only up to where one is needed.
    """

    def __init__(self, index: RecordIndex) -> None:
        self.index = index
        self.base = 0           # file offset of the buffer's first byte
        self.line = 1           # line number at file offset `counted`
        self.counted = 0
        self.depth = 0
        self.closed = self.after_comma = False
        self.elem_start = -1    # file offset of the element being read, -1 between elements
        self.elem_line = 0

    def run(self, f: BinaryIO) -> None:
        buf = b""
        eof = False
        while not eof:
            chunk = f.read(_CHUNK_BYTES)
            eof = not chunk
            if self.base == 0 and not buf and chunk.startswith(_BOM):
                self.base = self.counted = len(_BOM)
                chunk = chunk[len(_BOM):]
            buf += chunk
            keep = self._scan(buf, eof)
            self._line_at(buf, keep)
            if len(buf) - keep > _MAX_STRING_BYTES:
                raise self._error("string longer than 256 MiB (probably an unterminated quote)", buf, keep,
                                  "close the string that starts here with '\"'")
            buf, self.base = buf[keep:], self.base + keep
        if not self.closed:
            raise self.index._error(
                "file ends before the record array is closed",
                self.elem_line if self.elem_start != -1 else self.line,
                "check that every '[' / '{' is closed and every string is terminated; the "
                "record starting here is incomplete")

    def _line_at(self, buf: bytes, upto: int) -> int:
        self.line, self.counted = _advance(buf, self.base, self.line, self.counted, upto)
        return self.line

    def _error(self, problem: str, buf: bytes, at: int, fix: str) -> DataError:
        return self.index._error(problem, self._line_at(buf, at), fix)

    def _scan(self, buf: bytes, eof: bool) -> int:
        """Scan ``buf``; how much of it is consumed (a string it cuts off is kept for later)."""
        pos = 0
        while True:
            found = self._next(buf, pos)
            if found is None:
                return len(buf)
            at, c, pos, lone_quote = found
            if lone_quote:  # a quote whose string does not end within the buffer
                nl = buf.find(b"\n", at)
                if nl == -1 and not eof:
                    return at
                if nl == -1:
                    raise self._error("file ends inside a string (unterminated quote)", buf, at,
                                      "close the string that starts here with '\"'")
                # JSON strings cannot hold a raw newline: resume scanning there and let
                # json.loads of the record report the real problem.
                pos = nl
            pos = self._token(buf, at, c, pos)

    def _next(self, buf: bytes, pos: int) -> tuple[int, bytes, int, bool] | None:
        """The next token that matters: (its offset, its first byte, where scanning goes on,
        whether it is a string cut by the buffer's end)."""
        if self.depth >= 2:
            # Inside a record only brackets matter: skip strings and everything else in one
            # C-level regex match.
            pos = _SKIP.match(buf, pos).end()
            if pos >= len(buf):
                return None
            c = buf[pos:pos + 1]
            return pos, c, pos + 1, c == b'"'
        m = _TOKEN.search(buf, pos)
        if m is None:
            return None
        at, end = m.start(), m.end()
        c = buf[at:at + 1]
        return at, c, end, c == b'"' and end - at == 1

    def _token(self, buf: bytes, at: int, c: bytes, pos: int) -> int:
        if self.closed:
            raise self._error("extra data after the closing ']' of the record array", buf, at,
                              "remove everything after the final ']' (or merge the two arrays into one)")
        if self.depth == 1 and self.elem_start == -1 and c not in (b",", b"]", b"}"):
            self.elem_start, self.elem_line = self.base + at, self._line_at(buf, at)
        if c == b"[" or c == b"{":
            m = _RECORD.match(buf, at) if self.depth == 1 else None
            if m is not None:  # a whole record of usual depth in one match
                return m.end()
            self.depth += 1
        elif c == b"]" or c == b"}":
            if self.depth == 1:
                self._close(buf, at, c)
            self.depth -= 1
        elif c == b"," and self.depth == 1:
            if self.elem_start == -1:
                raise self._error("empty record between commas", buf, at,
                                  "remove the extra ',' (records are separated by exactly one comma)")
            self.index._add(self.elem_start, self.base + at, self.elem_line)
            self.elem_start, self.after_comma = -1, True
        return pos

    def _close(self, buf: bytes, at: int, c: bytes) -> None:
        """A bracket closing the array itself."""
        if c == b"}":
            raise self._error("unexpected '}' between records", buf, at,
                              "check the braces of the record before this line")
        if self.elem_start != -1:
            self.index._add(self.elem_start, self.base + at, self.elem_line)
        elif self.after_comma:
            raise self._error("trailing comma before ']'", buf, at, "remove the comma after the last record")
        self.closed = True


def _incomplete(data: bytes) -> bool:
    """True when ``data`` is the start of a JSON value that ends too early."""
    text = data.decode("utf-8", errors="replace").strip()
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return e.pos >= len(text)
    except (RecursionError, ValueError):
        return False  # complete enough to fail for another reason, reported when it is read
    return False


# Byte-order marks and magic numbers of files that are not UTF-8 JSON, longest first.
_FOREIGN_HEADS = (
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"), (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"), (b"\xfe\xff", "UTF-16 (big-endian)"),
    (b"\x1f\x8b", "gzip-compressed"), (b"PK\x03\x04", "a zip archive"),
)


def _fix_encoding(encoding: str) -> str:
    return f"re-save it as UTF-8, e.g. `iconv -f {encoding} -t UTF-8 IN > OUT`"


def _refuse_foreign_encoding(path: Path) -> None:
    """A dataset file that is not UTF-8 text is refused by name, not by its first odd byte."""
    with open(path, "rb") as f:
        head = f.read(64)
    for magic, what in _FOREIGN_HEADS:
        if head.startswith(magic):
            fix = "decompress it first" if "zip" in what else _fix_encoding(what.split()[0])
            raise DataError(f"file is {what}, not UTF-8 JSON", path=path, line=1, fix=fix)
    if b"\x00" in head:
        # UTF-16 without a byte-order mark puts a NUL beside every ASCII character.
        what = "UTF-16 without a byte-order mark" if head[1:2] == b"\x00" or head[:1] == b"\x00" else "binary"
        raise DataError(f"file holds NUL bytes: it looks {what}, not UTF-8 JSON", path=path, line=1,
                        fix=_fix_encoding("UTF-16") if what != "binary" else "point the config at the JSON/JSONL dataset file")


def _advance(buf: bytes, base: int, line: int, counted: int, upto: int) -> tuple[int, int]:
    """Count newlines between file offset ``counted`` and buffer position ``upto``."""
    line += buf.count(b"\n", counted - base, upto)
    return line, base + upto


__all__ = ["RecordIndex"]
