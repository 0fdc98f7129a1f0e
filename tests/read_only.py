"""A folder no process of this machine can write to, for real: permission bits for a normal
user, a read-only bind mount for root (root ignores permission bits)."""

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
