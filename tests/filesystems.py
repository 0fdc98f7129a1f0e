"""Real filesystems for the disk tests: a folder no process can write to (permission bits for a
normal user, a read-only bind mount for root, who ignores permission bits), and a small tmpfs
that really fills up (root only: mounting needs CAP_SYS_ADMIN)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return

    def mount(*args: str) -> None:
        done = subprocess.run(["mount", *args, str(path)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"mount {' '.join(args)}: {done.stderr} (root needs CAP_SYS_ADMIN here)"

    mount("--bind", str(path))
    try:
        mount("-o", "remount,ro,bind")
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"mount {' '.join(args)}: {done.stderr} (root needs CAP_SYS_ADMIN here)"


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``64k``, ``32m``) mounted at ``path`` for the duration."""
    assert os.geteuid() == 0, "a real full filesystem needs a tmpfs mount: run the suite as root (as CI does)"
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount(path: Path, options: str) -> None:
    """Change a mounted tmpfs on the fly (``size=...``, ``nr_inodes=...``)."""
    _mount("-o", f"remount,{options}", str(path))


def used_bytes_and_inodes(path: Path) -> tuple[int, int]:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree
