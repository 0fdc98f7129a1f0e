"""Shared, costly fixtures: built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("smolvlm", "llava_onevision")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (every record kind, train and eval)."""
    from hpc_train.data.synthetic import SyntheticSpec, make_dataset

    out = tmp_path_factory.mktemp("synthetic")
    make_dataset(out, SyntheticSpec(n_train=40, n_eval=10, seed=3))
    return out


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models of both families, saved once with save_pretrained."""
    from hpc_train.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: save_tiny(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def loaded_tiny(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple]:
    """(model, processor) per family, loaded back from the saved folders."""
    from hpc_train.config import ModelConfig
    from hpc_train.models.load import load_model_and_processor

    loaded = {}
    for family, path in tiny_model_dirs.items():
        model, processor = load_model_and_processor(ModelConfig(family=family, path=str(path)))
        model.eval()
        loaded[family] = (model, processor)
    return loaded
