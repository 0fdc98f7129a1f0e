"""ZeRO-3 partitions gathered whole for a moment, where code outside a module's own forward
reads its weights (export, the vision cache's weights digest, ``generate``'s helpers)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


def gathered(params: Iterable[torch.nn.Parameter]) -> AbstractContextManager[Any]:
    """The ZeRO-3-partitioned ones among ``params`` whole on every rank inside the block (read
    only; collective: every rank passes the same parameters); nothing to do without ZeRO-3."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
