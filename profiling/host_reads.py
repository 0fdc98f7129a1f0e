"""Count the places where the host waits for the device, by call site, on any machine.

On a GPU each of these is a stall: the host cannot queue more kernels until the device has
caught up. They are visible on a CPU too, because they are the same PyTorch ops:

- ``scalar``: ``aten._local_scalar_dense``, the op behind ``.item()``, ``float(t)``, ``int(t)``
  and ``if t:``;
- ``shape``: ops whose output size depends on the data (``nonzero``, boolean indexing,
  ``masked_select``, ``unique``), which must read the device to size their result;
- ``tolist``: ``Tensor.tolist()``, which copies without dispatching an op (counted by
  wrapping the method while counting).

Use: ``with HostReads() as reads: ...`` then ``reads.by_site()`` / ``reads.total``.
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR = {torch.ops.aten._local_scalar_dense.default}
_SHAPE = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
          torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default,
          torch.ops.aten.unique_consecutive.default}
_INDEX = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}

_TORCH_DIR = torch.__file__.rsplit("/", 1)[0] + "/"
_HERE = __file__


@dataclass(frozen=True)
class Site:
    """Where a read came from: the innermost frame outside PyTorch itself."""

    kind: str
    file: str
    line: int
    function: str

    @property
    def owner(self) -> str:
        """The project the frame belongs to (``hpc_train``, ``transformers``, ``deepspeed``...)."""
        return self.file.split("/", 1)[0]

    def __str__(self) -> str:
        return f"{self.kind:6s} {self.file}:{self.line} {self.function}"


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    for package in ("hpc_train/", "profiling/", "benchmarks/", "tests/"):
        if package in path:
            return package + path.split(package, 1)[1]
    return path


def _call_site(kind: str) -> Site:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename == _HERE or frame.filename.startswith(_TORCH_DIR):
            continue
        return Site(kind, _short(frame.filename), frame.lineno or 0, frame.name)
    return Site(kind, "torch", 0, "?")


def _boolean_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostReads(TorchDispatchMode):
    """A dispatch mode counting device-to-host reads by :class:`Site` (this thread only)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[Site] = Counter()
        self._tolist: Any = None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func in _SCALAR:
            self.sites[_call_site("scalar")] += 1
        elif func in _SHAPE or (func in _INDEX and _boolean_index(args)):
            self.sites[_call_site("shape")] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostReads:
        original = torch.Tensor.tolist
        counter = self

        def tolist(tensor: torch.Tensor) -> Any:
            counter.sites[_call_site("tolist")] += 1
            return original(tensor)

        self._tolist = original
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def by_owner(self) -> Counter[str]:
        owners: Counter[str] = Counter()
        for site, n in self.sites.items():
            owners[site.owner] += n
        return owners

    def by_site(self) -> list[tuple[Site, int]]:
        """Sites, most frequent first."""
        return sorted(self.sites.items(), key=lambda item: (-item[1], str(item[0])))

    def report(self, per: float = 1.0, file: Any = None) -> None:
        """Print each site's count divided by ``per`` (e.g. the number of optimizer steps)."""
        out = file or sys.stdout
        for site, n in self.by_site():
            print(f"  {n / per:6.1f}  {site}", file=out)
        print(f"  {self.total / per:6.1f}  in all ({', '.join(f'{o} {n / per:.1f}' for o, n in self.by_owner().most_common())})",
              file=out)


__all__ = ["HostReads", "Site"]
