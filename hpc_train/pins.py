"""The tested versions (``hpc_train/constraints.txt``, written by ``.ci/pin``) against what is
installed here. Standard library only: ``hpc-train doctor`` must run where nothing else is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

CONSTRAINTS = Path(__file__).with_name("constraints.txt")
INSTALL_FIX = 'pip install -c hpc_train/constraints.txt -e ".[test]" (from the hpc-train checkout)'


def normalize(name: str) -> str:
    """A distribution name as pip compares them (``PyYAML`` = ``pyyaml``, ``flash_attn`` = ``flash-attn``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Pins:
    versions: dict[str, str]
    """Normalized distribution name → pinned version."""
    python: str | None
    """The Python version the pins were resolved with (``None``: not recorded)."""


def read_pins(path: Path = CONSTRAINTS) -> Pins:
    """The pins file's ``name==version`` lines and its ``# python X.Y.Z`` header."""
    versions: dict[str, str] = {}
    python = None
    for line in path.read_text().splitlines():
        header = re.match(r"#\s*python\s+(\d+\.\d+(?:\.\d+)?)", line)
        if header:
            python = header.group(1)
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            versions[normalize(name)] = version.strip()
    return Pins(versions, python)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def drift(pins: Pins, names: list[str] | None = None) -> dict[str, tuple[str | None, str]]:
    """``name → (installed, pinned)`` for every pinned package (or those of ``names``) whose
    installed version differs from its pin; ``installed`` is ``None`` when it is missing."""
    out = {}
    for name in names if names is not None else sorted(pins.versions):
        pinned = pins.versions.get(normalize(name))
        if pinned is None:
            continue
        found = installed_version(name)
        if found != pinned:
            out[name] = (found, pinned)
    return out
