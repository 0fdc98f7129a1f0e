"""Python and the installed packages against setup.cfg's ranges and the tested pins."""

from __future__ import annotations

import configparser
import platform
import re
from importlib import metadata
from pathlib import Path

from hpc_train.doctor.table import Check
from hpc_train.pins import INSTALL_FIX, Pins, drift, installed_version, normalize

# Each gets a row of its own; every other requirement and pin is summed up in one row each.
KEY_PACKAGES = ("torch", "torchvision", "transformers", "deepspeed", "peft", "accelerate", "bitsandbytes",
                "decord", "torchcodec", "av", "librosa", "mpi4py")
SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"


def requirements() -> dict[str, str]:
    """``name → version range`` the toolkit needs: the installed hpc-train's metadata, or the
    checkout's setup.cfg when it runs from source."""
    try:
        lines = [r for r in metadata.requires("hpc-train") or [] if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        lines = _setup_cfg_requirements()
    out = {}
    for line in lines:
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", line.split(";")[0])
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _setup_cfg_requirements() -> list[str]:
    if not SETUP_CFG.is_file():
        return list(KEY_PACKAGES)
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    return [r for r in cfg.get("options", "install_requires", fallback="").splitlines() if r.strip()]


def python_check(pins: Pins) -> Check:
    here = platform.python_version()
    if pins.python is None or here.startswith(pins.python.rsplit(".", 1)[0] + "."):
        return Check("python", "ok", here, f"tested: {pins.python}" if pins.python else "")
    return Check("python", "warn", here, f"the pins were tested on Python {pins.python}; other versions "
                                         "may resolve other wheels")


def in_range(version: str, spec: str) -> bool | None:
    """Whether ``version`` satisfies ``spec`` (``None``: cannot tell without ``packaging``)."""
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return None
    return SpecifierSet(spec).contains(version, prereleases=True) if spec else True


def package_check(name: str, spec: str, pins: Pins) -> Check:
    found = installed_version(name)
    pinned = pins.versions.get(normalize(name))
    if found is None:
        return Check(name, "fail", "not installed")
    if in_range(found, spec) is False:
        return Check(name, "fail", found, f"outside the supported range {spec} (tested {pinned}). Fix: {INSTALL_FIX}")
    if pinned is not None and found != pinned:
        return Check(name, "warn", found, f"drift: tested {pinned}")
    return Check(name, "ok", found, "as tested" if pinned else "")


def package_checks(pins: Pins) -> list[Check]:
    """A row per key package, one for the other requirements, one for the remaining pins."""
    needed = requirements()
    rows = [package_check(name, needed.get(name, ""), pins) for name in KEY_PACKAGES]
    others = [package_check(name, spec, pins) for name, spec in needed.items() if name not in KEY_PACKAGES]
    rows = _fix_once([*rows, _summary("other requirements", others)])
    return [*rows, _other_pins_check(pins, {normalize(n) for n in (*KEY_PACKAGES, *needed)})]


def _fix_once(rows: list[Check]) -> list[Check]:
    """The install command, on the first row with a missing package (one command installs all)."""
    missing = [i for i, r in enumerate(rows) if r.status == "fail" and "not installed" in f"{r.found} {r.note}"]
    if missing:
        first = rows[missing[0]]
        note = f"{first.note}; " * bool(first.note) + f"Fix: {INSTALL_FIX} installs them all"
        rows[missing[0]] = Check(first.name, "fail", first.found, note)
    return rows


def _other_pins_check(pins: Pins, required: set[str]) -> Check:
    """The pins of what the requirements pull in. One that is not installed is fine here: it
    belongs to another platform's wheels."""
    rest = [n for n in sorted(pins.versions) if n not in required]
    drifted = {n: v for n, v in drift(pins, rest).items() if v[0] is not None}
    named = ", ".join(f"{n} {have} (tested {want})" for n, (have, want) in drifted.items())
    return Check("other pinned packages", "warn" if drifted else "ok",
                 f"{len(rest) - len(drifted)} as tested or absent", f"drift: {named}" if drifted else "")


def _summary(name: str, checks: list[Check]) -> Check:
    """One row for many packages: how many are as tested, and what is wrong with the others."""
    bad = [c for c in checks if c.status in ("warn", "fail")]
    status = "fail" if any(c.status == "fail" for c in bad) else "warn" if bad else "ok"
    note = "; ".join(f"{c.name} {c.found}" + (f" ({c.note})" if c.note else "") for c in bad)
    return Check(name, status, f"{len(checks) - len(bad)} of {len(checks)} as tested", note)
