"""DeepSpeed's JIT-compiled ops: one build folder per environment, a line while one compiles,
and none at all where plain gloo serves.

torch keeps JIT builds in one folder per Python/CUDA tag (``~/.cache/torch_extensions/py311_cu130``)
and rebuilds an op whenever its build flags change. Two virtualenvs on one machine (a user's and
CI's, two checkouts) pass different include paths, so each launch in the other one rebuilds:
a minute before the first log line, every time. A folder per environment (and CPU model:
DeepSpeed builds CPU ops with ``-march=native``) builds each op once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

SHM_COMM = "deepspeed_shm_comm"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment_extensions_dir() -> Path:
    """This environment's build folder, next to torch's own default."""
    key = "|".join((sys.prefix, platform.python_version(), platform.machine(), _cpu_model()))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "torch_extensions" / f"hpc-train-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def use_environment_extensions_dir() -> None:
    """Point ``TORCH_EXTENSIONS_DIR`` at this environment's folder, unless the user chose one."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(environment_extensions_dir()))


def is_built(op_name: str) -> bool:
    """An earlier run left this op's library in the build folder."""
    folder = os.environ.get("TORCH_EXTENSIONS_DIR")
    return bool(folder) and any((Path(folder) / op_name).glob("*.so"))


def announce_build(op_name: str, what: str, *, main: bool) -> None:
    """One line before DeepSpeed compiles an op for the first time here (it says nothing for a minute)."""
    if main and not is_built(op_name):
        where = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's extensions folder")
        print(f"building DeepSpeed's {what} ({op_name}) for this environment, once: about a minute, "
              f"into {where}", flush=True)


def skip_shared_memory_comm() -> None:
    """Tell DeepSpeed not to build its shared-memory collective op for a gloo process group.

    Only DeepSpeed's inference all-reduce (tensor-parallel inference) uses it; training's
    collectives go through torch.distributed, so building it is a minute spent for nothing.
    DeepSpeed reads op compatibility from ``deepspeed.ops.__compatible_ops__``, one dict kept for
    the whole process so that edits to it hold.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM] = False
