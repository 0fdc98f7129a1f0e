"""Shared, costly fixtures: built once per test session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("smolvlm", "smolvlm2", "llava_onevision", "llava_onevision_1_5")
TINY_RECIPES = {family: f"tiny_{family}" for family in FAMILIES}
"""Each family's recipe of a tiny random model (``hpc_train/recipes``)."""


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (every record kind, train and eval)."""
    from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset

    out = tmp_path_factory.mktemp("synthetic")
    make_dataset(out, SyntheticSpec(n_train=40, n_eval=10, seed=3))
    return out


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models of every family, saved once with save_pretrained; LLaVA-OneVision-1.5's
    then rewritten in its published folder's file layout (remote code and all, never run)."""
    from hpc_train.models.tiny import save_tiny
    from tests.hub_layout import published_layout

    root = tmp_path_factory.mktemp("tiny_models")
    folders = {family: save_tiny(family, root / family) for family in FAMILIES}
    published_layout(folders["llava_onevision_1_5"])
    return folders


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


@pytest.fixture(scope="session")
def varlen_tiny(loaded_tiny: dict[str, tuple]) -> dict[str, Any]:
    """Per family, an fp32 copy of the loaded tiny model with our attention (the packed-row
    kernels and the host-decided masks); ``loaded_tiny`` keeps transformers' own."""
    import copy

    from hpc_train.models.attention import use_varlen_attention

    copies = {}
    for family, (model, _) in loaded_tiny.items():
        copies[family] = copy.deepcopy(model).float().eval()
        use_varlen_attention(copies[family])
    return copies


def mixed_samples(loaded_tiny: dict, synthetic_data: Path, family: str) -> list:
    """One encoded sample of each kind: text-only, image, two images, video, audio."""
    from hpc_train.config import DataConfig
    from hpc_train.data.dataset import MediaLoader, SampleDataset
    from hpc_train.data.encoding.tokenize import ChatEncoder
    from hpc_train.data.sources.records import read_records
    from hpc_train.models.families import get_family

    cfg = DataConfig(video={"num_frames": 4})
    records = read_records(synthetic_data / "train.jsonl", media_root=cfg.media_root)
    dataset = SampleDataset(records, ChatEncoder(loaded_tiny[family][1], get_family(family)),
                            MediaLoader(cfg), cfg)
    picked: dict[str, int] = {}
    for i, rec in enumerate(records):
        picked.setdefault(rec.kind, i)
    wanted = ["text", "image", "multi_image", "video", "audio"]
    assert set(wanted) <= set(picked), picked
    return [dataset[picked[k]] for k in wanted]
