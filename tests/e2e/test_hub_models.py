"""A model named by hub id, as model cards name it: trained offline from the local Hugging Face
cache, pinned to its commit in what the run writes; and `hpc-train download` up to the network."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from hpc_train.train.profile_report import PROFILE_REPORT
from tests.distributed.conftest import child_env
from tests.hub_cache import cache_repo

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def hpc_train(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_train", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_run_from_a_hub_id_records_the_commit_it_trained(tiny_model_dirs, synthetic_data, tmp_path):
    """A SmolVLM2 repo in the hub cache, through the shipped SmolVLM2 recipe (the family read from it)."""
    cache_repo(tmp_path / "hf" / "hub", "acme/tiny-smolvlm2", tiny_model_dirs["smolvlm2"], COMMIT)
    env = {**child_env(), "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "out"
    trained = hpc_train("train", "smolvlm2_lora", "model.path=acme/tiny-smolvlm2", "data.vision_cache=null",
                        "data.media_root=null", "train.grad_accum=1", "profile.copy_to=null",
                        f"data.train={synthetic_data / 'train.jsonl'}", "data.eval=null", "data.num_workers=0",
                        f"output_dir={out}", "train.max_steps=1",
                        "train.device=cpu", "profile.enabled=true", "profile.warmup_steps=0", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["model"]["path"] == f"acme/tiny-smolvlm2@{COMMIT}" and resolved["model"]["family"] == "smolvlm2"
    run = json.loads((out / PROFILE_REPORT).read_text())["run"]
    assert run["model"] == f"acme/tiny-smolvlm2@{COMMIT}" and run["model_revision"] == COMMIT and run["family"] == "smolvlm2"
    assert run["video_backend"] == "torchcodec"  # auto, where torchcodec decodes


def test_download_is_offline_safe_and_says_what_to_do(tiny_model_dirs, tmp_path):
    cache = tmp_path / "hub"
    cache_repo(cache, "acme/tiny-smolvlm", tiny_model_dirs["smolvlm"], COMMIT)
    env = {**child_env(), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    have = hpc_train("download", "acme/tiny-smolvlm", env=env)
    assert have.returncode == 0, have.stderr[-3000:]
    assert f"acme/tiny-smolvlm at commit {COMMIT} is in {cache / 'models--acme--tiny-smolvlm'}" in have.stdout
    assert f"model.path=acme/tiny-smolvlm@{COMMIT} (pinned)" in have.stdout
    absent = hpc_train("download", "acme/absent@v2", env=env)
    assert absent.returncode == 2
    assert absent.stderr.startswith(f"error: acme/absent@v2: could not be fetched into {cache}: ")
    assert "HF_HUB_OFFLINE unset" in absent.stderr
    cache_repo(cache, "acme/balls", tiny_model_dirs["smolvlm"], COMMIT, repo_type="dataset")
    dataset = hpc_train("download", "acme/balls", "--repo-type", "dataset", env=env)
    assert dataset.returncode == 0, dataset.stderr[-3000:]
    snapshot = cache / "datasets--acme--balls" / "snapshots" / COMMIT
    assert f"point data.train at its JSON / JSONL file there (data.train={snapshot}/<file>" in dataset.stdout
    not_an_id = hpc_train("download", "./models/x", env=env)
    assert not_an_id.returncode == 2 and "not a hub id" in not_an_id.stderr
