"""Trackers across a requeue, and every way they can be misconfigured."""

from __future__ import annotations

import json
import sys

import pytest
from pydantic import ValidationError

from hpc_train.config import RunConfig, TrainConfig
from hpc_train.errors import ConfigError
from hpc_train.train.trackers import IDS_FILE, check_trackers, open_trackers
from tests.wandb_offline import read_offline_run


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)


def log_steps(config: RunConfig, steps: range, *, resumed: bool) -> None:
    trackers = open_trackers(config, resumed=resumed)
    for step in steps:
        for tracker in trackers:
            tracker.log(step, {"loss": 1.0 / step})
    for tracker in trackers:
        tracker.close()


def test_a_resumed_run_goes_on_in_the_same_tracker_runs_and_a_fresh_one_starts_new_ones(tmp_path, offline):
    from mlflow import MlflowClient

    config = RunConfig(name="requeued", output_dir=str(tmp_path), model={"preset": "tiny"}, train={"report_to": ["wandb", "mlflow"]})
    log_steps(config, range(1, 3), resumed=False)
    first = json.loads((tmp_path / IDS_FILE).read_text())
    log_steps(config, range(3, 5), resumed=True)  # the requeued job
    assert json.loads((tmp_path / IDS_FILE).read_text()) == first
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(first["mlflow"], "loss")] == [1, 2, 3, 4]
    assert client.get_run(first["mlflow"]).info.status == "FINISHED"
    logs = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    runs = [read_offline_run(log) for log in logs]  # wandb sync joins the two by their id
    assert {r["id"] for r in runs} == {first["wandb"]}
    assert sorted(row["_step"] for r in runs for row in r["history"]) == [1, 2, 3, 4]

    log_steps(config, range(1, 2), resumed=False)  # train.resume=false: started over
    again = json.loads((tmp_path / IDS_FILE).read_text())
    assert again["wandb"] != first["wandb"] and again["mlflow"] != first["mlflow"]


def test_a_tracker_that_does_not_import_stops_the_run_with_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python sees a package that is not installed
    with pytest.raises(ConfigError, match=r"train.report_to names wandb, which does not import here .*"
                                          r"Fix: pip install -c hpc_train/constraints.txt -e \"\.\[trackers\]\""):
        check_trackers(["tensorboard", "wandb"])


def test_an_mlflow_store_that_cannot_be_opened_is_named_with_a_fix(tmp_path, offline, monkeypatch):
    (tmp_path / "a-file").write_text("")
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = RunConfig(output_dir=str(tmp_path / "out"), model={"preset": "tiny"}, train={"report_to": ["mlflow"]})
    with pytest.raises(ConfigError, match=f"train.report_to mlflow, tracking URI {uri}: .*Fix: set "
                                          "MLFLOW_TRACKING_URI to a store this node reaches"):
        open_trackers(config, resumed=False)


def test_report_to_takes_known_trackers_once_each():
    assert TrainConfig().report_to == ["tensorboard"] and TrainConfig(report_to=[]).report_to == []
    with pytest.raises(ValidationError, match="names wandb more than once"):
        TrainConfig(report_to=["wandb", "tensorboard", "wandb"])
    with pytest.raises(ValidationError, match="'tensorboard', 'wandb' or 'mlflow'"):
        TrainConfig(report_to=["comet"])
