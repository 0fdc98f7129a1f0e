"""Models by hub id: resolved offline from a cache laid out by huggingface_hub's own helpers."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import scan_cache_dir

from hpc_train.config import ModelConfig
from hpc_train.errors import ConfigError
from hpc_train.models.hub import HubId, resolve
from hpc_train.models.load import adapter_folder, load_processor, model_family, pin_revisions
from tests.hub_cache import cache_repo

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLDER = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dirs):
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cache_repo(cache, "acme/tiny-smolvlm", tiny_model_dirs["smolvlm"], OLDER, refs=("v1",))
    cache_repo(cache, "acme/tiny-smolvlm", tiny_model_dirs["smolvlm"], COMMIT, refs=("main",))
    return cache


@pytest.mark.parametrize(("text", "expected"), [
    ("HuggingFaceTB/SmolVLM-256M-Instruct", HubId("HuggingFaceTB/SmolVLM-256M-Instruct")),
    ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf@v1.0", HubId("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "v1.0")),
    (f"acme/m@{COMMIT}", HubId("acme/m", COMMIT)),
    ("./acme/m", None), ("/models/acme", None), ("~/acme/m", None), ("a/b/c", None), ("single", None),
    ("acme/m@", None), ("acme/-m", None),
])
def test_hub_ids_are_told_from_paths(text, expected):
    assert HubId.parse(text) == expected


def test_an_existing_folder_is_a_folder_even_when_it_looks_like_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "m").mkdir(parents=True)
    assert HubId.parse("acme/m") is None


def test_the_test_cache_is_one_huggingface_hub_reads_as_complete(hub_cache):
    (repo,) = scan_cache_dir(hub_cache).repos
    assert repo.repo_id == "acme/tiny-smolvlm" and repo.repo_type == "model"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {COMMIT: {"main"}, OLDER: {"v1"}}
    assert not scan_cache_dir(hub_cache).warnings


@pytest.mark.parametrize(("text", "commit"), [
    ("acme/tiny-smolvlm", COMMIT), ("acme/tiny-smolvlm@main", COMMIT), ("acme/tiny-smolvlm@v1", OLDER),
    (f"acme/tiny-smolvlm@{OLDER}", OLDER),
])
def test_a_hub_id_resolves_offline_to_its_snapshot_and_pins_its_commit(hub_cache, text, commit):
    got = resolve(text)
    assert got.folder == hub_cache / "models--acme--tiny-smolvlm" / "snapshots" / commit
    assert got.commit == commit and got.pinned(text) == f"acme/tiny-smolvlm@{commit}"


def test_a_hub_id_loads_and_checks_as_a_folder_does(hub_cache, tiny_model_dirs):
    model = ModelConfig(family="smolvlm", path="acme/tiny-smolvlm")
    assert model_family(model).name == "smolvlm"
    from_cache, from_folder = load_processor(model), load_processor(ModelConfig(path=str(tiny_model_dirs["smolvlm"])))
    assert from_cache.tokenizer.get_vocab() == from_folder.tokenizer.get_vocab()
    with pytest.raises(ConfigError, match="model_type 'idefics3' is the smolvlm family"):
        model_family(ModelConfig(family="llava_onevision", path="acme/tiny-smolvlm"))
    pinned = pin_revisions(model)
    assert pinned.path == f"acme/tiny-smolvlm@{COMMIT}" and pinned.family == "smolvlm"
    folder = ModelConfig(path=str(tiny_model_dirs["smolvlm"]))
    assert pin_revisions(folder) == folder


def test_a_model_not_in_the_cache_names_the_id_the_cache_and_the_fix(hub_cache):
    with pytest.raises(ConfigError) as missing:
        resolve("acme/absent@v2")
    said = str(missing.value)
    assert said.startswith("model.path=acme/absent@v2: no folder of that name here")
    assert "acme/absent (revision v2) is not in the Hugging Face cache at " + str(hub_cache) in said
    assert "`hpc-train download acme/absent@v2`" in said and "HF_HOME" in said
    with pytest.raises(ConfigError, match="revision v9"):
        resolve("acme/tiny-smolvlm@v9")


def test_a_download_cut_short_is_refused_not_loaded(hub_cache, tiny_model_dirs):
    cache_repo(hub_cache, "acme/cut", tiny_model_dirs["smolvlm"], COMMIT, missing=("model.safetensors",))
    with pytest.raises(ConfigError, match=r"acme/cut \(its default branch\) is only partly in the Hugging Face"):
        resolve("acme/cut")


def test_an_adapter_id_must_hold_an_adapter(hub_cache, tmp_path):
    with pytest.raises(ConfigError, match="model.adapter=acme/tiny-smolvlm: the cached snapshot .* holds no "
                                          "adapter_config.json, so it is not a LoRA adapter repo"):
        adapter_folder("acme/tiny-smolvlm")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    cache_repo(hub_cache, "acme/tiny-lora", adapter, COMMIT)
    assert adapter_folder("acme/tiny-lora") == hub_cache / "models--acme--tiny-lora" / "snapshots" / COMMIT
    model = pin_revisions(ModelConfig(preset="tiny", adapter="acme/tiny-lora"))
    assert model.adapter == f"acme/tiny-lora@{COMMIT}"
