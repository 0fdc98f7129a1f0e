"""``metrics.jsonl`` (one flushed line per logged step) and TensorBoard, on rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hpc_train.train.output_dir import writing


class MetricsLogger:
    """Appends step metrics; on resume, drops lines written after the checkpoint it resumes from."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        with writing(self.path):
            self._start(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None
        self._handle = self.path.open("a")

    def _start(self, resume_step: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
            if kept != lines:  # a file with nothing to drop is left as it is
                self.path.write_text("".join(f"{line}\n" for line in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with writing(self.path):
            self._handle.write(json.dumps(row) + "\n")
            self._handle.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._handle.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return round(value, 8) if math.isfinite(value) else str(value)
    return value
