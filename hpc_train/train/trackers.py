"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow, each given
the scalars of ``metrics.jsonl`` by rank 0, with the run's name and resolved config.

A run that resumes (a requeued job) goes on in the tracker runs it started: their ids are kept
in ``OUTPUT_DIR/trackers.json``; a run that starts over (``train.resume=false``) starts new ones.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from hpc_train.config import RunConfig
from hpc_train.errors import ConfigError

IDS_FILE = "trackers.json"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
FIX_INSTALL = "pip install -c hpc_train/constraints.txt -e \".[trackers]\", or leave it out of train.report_to"
DEFAULT_PROJECT = "hpc-train"


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One logged step's scalars."""

    def close(self) -> None:
        """Flush and end the tracker's run."""


def check_trackers(names: list[str]) -> None:
    """Every tracker asked for imports here (on every rank, so all stop alike before any loads)."""
    for name in names:
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError as exc:
            raise ConfigError(f"train.report_to names {name}, which does not import here ({exc}). "
                              f"Fix: {FIX_INSTALL}") from None


def scalars_of(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line, its step left out."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v)}


def open_trackers(config: RunConfig, *, resumed: bool) -> list[Tracker]:
    """The run's trackers, going on in the runs of ``trackers.json`` when the run resumes."""
    out = Path(config.output_dir)
    ids = _read_ids(out) if resumed else {}
    trackers: list[Tracker] = []
    for name in config.train.report_to:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(out / "tensorboard"))
        elif name == "wandb":
            trackers.append(WandbTracker(config, ids.get("wandb")))
            ids["wandb"] = trackers[-1].run_id
        else:
            trackers.append(MlflowTracker(config, ids.get("mlflow")))
            ids["mlflow"] = trackers[-1].run_id
    if {"wandb", "mlflow"} & set(config.train.report_to):
        _write_ids(out, ids)
    return trackers


def _read_ids(out: Path) -> dict[str, str]:
    path = out / IDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_ids(out: Path, ids: dict[str, str]) -> None:
    tmp = out / f".{IDS_FILE}.tmp"
    tmp.write_text(json.dumps(ids, indent=1) + "\n")
    os.replace(tmp, out / IDS_FILE)


class TensorBoardTracker:
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(folder))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """A wandb run in ``OUTPUT_DIR/wandb``; offline where ``WANDB_MODE=offline`` (``wandb sync`` later)."""

    def __init__(self, config: RunConfig, run_id: str | None) -> None:
        import wandb

        try:
            self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=config.name,
                                   id=run_id, resume="allow", dir=config.output_dir, job_type="train",
                                   config=config.model_dump(mode="json"), settings=wandb.Settings(console="off"))
        except Exception as exc:  # wandb raises its own errors for a missing login, a refused project
            raise ConfigError(f"train.report_to wandb: {type(exc).__name__}: {str(exc)[:300]}. Fix: `wandb login` "
                              "(or WANDB_API_KEY), or WANDB_MODE=offline on nodes without internet and `wandb "
                              "sync OUTPUT_DIR/wandb/offline-run-*` later") from None
        self.run_id: str = self._run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """An MLflow run on ``MLFLOW_TRACKING_URI`` (default: SQLite in the output folder), the config
    as its parameters (one per key)."""

    def __init__(self, config: RunConfig, run_id: str | None) -> None:
        from mlflow import MlflowClient

        out = Path(config.output_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
        try:
            self._client = MlflowClient(uri)
            self.run_id = run_id if run_id is not None else self._start(config, out)
            if run_id is not None:
                self._client.update_run(run_id, status="RUNNING")
        except Exception as exc:  # a store MLflow cannot open: SQLite without SQLAlchemy, a server down
            raise ConfigError(f"train.report_to mlflow, tracking URI {uri}: {type(exc).__name__}: {str(exc)[:300]}. "
                              f"Fix: set MLFLOW_TRACKING_URI to a store this node reaches, or {FIX_INSTALL}") from None

    def _start(self, config: RunConfig, out: Path) -> str:
        from mlflow.entities import Param

        client = self._client
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else client.create_experiment(
            name, artifact_location=(out / "mlflow-artifacts").as_uri())
        run_id = client.create_run(experiment, run_name=config.name).info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in _flat(config.model_dump(mode="json")).items()])
        return run_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-4}}`` → ``{"train.lr": "0.0001"}``: MLflow parameters are flat strings."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (value if isinstance(value, str) else json.dumps(value))[:6000]
    return out
