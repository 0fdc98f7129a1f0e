"""One row of ``hpc-train doctor``, and the table of them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

STATUSES = ("ok", "info", "warn", "fail")
"""``fail`` is a blocker (the doctor exits 1); ``warn`` runs, but not as tested; ``info`` is a fact."""


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    found: str
    note: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")


def blockers(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail"]


def format_table(checks: list[Check]) -> str:
    """Aligned columns: check, status, what was found, and what to do about it."""
    width = max(len(c.name) for c in checks)
    found_width = min(48, max(len(c.found) for c in checks))
    lines = []
    for c in checks:
        line = f"{c.name:<{width}}  {c.status.upper():<4}  {c.found:<{found_width}}"
        lines.append(f"{line}  {c.note}".rstrip())
    failed, warned = len(blockers(checks)), sum(c.status == "warn" for c in checks)
    verdict = (f"{failed} blocker(s): fix the FAIL rows before launching" if failed
               else "no blockers" + (f"; {warned} warning(s)" if warned else ""))
    return "\n".join([*lines, "", f"hpc-train doctor: {verdict}"])


def write_json(checks: list[Check], path: str | Path) -> None:
    rows = [asdict(c) for c in checks]
    Path(path).write_text(json.dumps({"blockers": len(blockers(checks)), "checks": rows}, indent=2) + "\n")
