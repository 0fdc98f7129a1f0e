"""Error types that carry where a bad value came from and how to fix it.

Every error a user can cause names the file, the line (or record id) and a fix, so the
message alone is enough to act on.
"""

from __future__ import annotations

from pathlib import Path


class HpcTrainError(Exception):
    """Base class for every error hpc-train raises on purpose."""


class ConfigError(HpcTrainError):
    """A configuration value or key is wrong."""


class DataError(HpcTrainError):
    """A dataset record, or a file it refers to, is unusable.

    The message reads ``<file>:<line> [id <id>]: <problem>. Fix: <fix>``.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        record_id: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = str(path) if path is not None else None
        self.line = line
        self.record_id = record_id
        self.fix = fix
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.path or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        if self.record_id is not None:
            where += f" [id {self.record_id}]"
        text = f"{where}: {self.problem}"
        if self.fix:
            text += f". Fix: {self.fix}"
        return text

    def at(self, *, path: str | Path | None = None, line: int | None = None,
           record_id: str | None = None) -> DataError:
        """This error placed at a dataset record.

        An error about a media file keeps that file's path in its problem text, and the
        record's file and line become the location, so the message names both.
        """
        problem = self.problem
        if path is not None and self.path is not None and self.path != str(path):
            problem = f"{self.path}: {problem}"
            line_here = line
        else:
            line_here = self.line if self.line is not None else line
        return type(self)(
            problem,
            path=path if path is not None else self.path,
            line=line_here,
            record_id=self.record_id or record_id,
            fix=self.fix,
        )


class MediaError(DataError):
    """A media file (video, image, audio) is missing, unreadable or empty."""
