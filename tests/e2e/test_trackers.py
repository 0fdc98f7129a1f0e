"""``train.report_to``: a real run logs to TensorBoard, wandb (offline) and MLflow (SQLite), and
each tracker, read back with its own reader, holds the scalars of ``metrics.jsonl``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpc_train.train.metrics import read_metrics
from hpc_train.train.trackers import IDS_FILE, scalars_of
from tests.distributed.conftest import child_env
from tests.wandb_offline import read_offline_run


def tensorboard_scalars(folder: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def wandb_scalars(out: Path) -> tuple[dict, dict[int, dict[str, float]]]:
    (log,) = out.glob("wandb/offline-run-*/run-*.wandb")
    run = read_offline_run(log)
    steps = {row["_step"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in run["history"]}
    return run, steps


def mlflow_scalars(out: Path, run_id: str) -> tuple[object, dict[int, dict[str, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(run_id)
    steps: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run_id, key):
            steps.setdefault(metric.step, {})[key] = metric.value
    return run, steps


def assert_same(tracked: dict[int, dict[str, float]], expected: dict[int, dict[str, float]], rel: float) -> None:
    assert sorted(tracked) == sorted(expected)
    for step, values in expected.items():
        assert tracked[step] == pytest.approx(values, rel=rel), step


def test_every_tracker_holds_the_runs_scalars_name_and_config(tiny_model_dirs, synthetic_data, tmp_path):
    out = tmp_path / "out"
    env = {**child_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for unset in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        env.pop(unset, None)
    done = subprocess.run(
        [sys.executable, "-m", "hpc_train", "train", "tiny_smolvlm", f"model.path={tiny_model_dirs['smolvlm']}",
         "model.preset=null", f"data.train={synthetic_data / 'train.jsonl'}",
         f"data.eval={synthetic_data / 'eval.jsonl'}", "eval.max_samples=4", "eval.generate=false",
         "train.eval_every=2",
         f"output_dir={out}", "name=tracked", "data.num_workers=0", "train.max_steps=3", "train.device=cpu",
         "train.report_to=[tensorboard,wandb,mlflow]"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected: dict[int, dict[str, float]] = {}
    for row in read_metrics(out / "metrics.jsonl"):  # an evaluation's line shares its step's number
        expected.setdefault(row["step"], {}).update(scalars_of(row))
    assert sorted(expected) == [1, 2, 3] and "loss" in expected[1] and "eval_loss" in expected[2]
    assert_same(tensorboard_scalars(out / "tensorboard"), expected, rel=1e-6)  # stored as float32

    ids = yaml.safe_load((out / IDS_FILE).read_text())
    wandb_run, wandb_steps = wandb_scalars(out)
    assert wandb_run["name"] == "tracked" and wandb_run["id"] == ids["wandb"]
    assert wandb_run["config"]["train"]["max_steps"] == 3 and wandb_run["config"]["name"] == "tracked"
    assert_same(wandb_steps, expected, rel=1e-12)

    mlflow_run, mlflow_steps = mlflow_scalars(out, ids["mlflow"])
    assert mlflow_run.info.run_name == "tracked" and mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["train.max_steps"] == "3" and mlflow_run.data.params["output_dir"] == str(out)
    assert_same(mlflow_steps, expected, rel=1e-12)
