"""Tiny offline models: saved and loaded like real checkpoints, bitsandbytes-friendly widths."""

from __future__ import annotations

import json

import pytest
import torch

from hpc_train.config import ModelConfig
from hpc_train.errors import ConfigError
from hpc_train.models.families import FAMILIES as FAMILY_SPECS
from hpc_train.models.load import load_model_and_processor, model_family
from hpc_train.models.tiny import build_tiny
from tests.conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_reloads_identically(tiny_model_dirs, loaded_tiny, family):
    folder = tiny_model_dirs[family]
    files = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "processor_config.json")
    if family == "llava_onevision_1_5":  # the published folder's layout (tests/hub_layout.py)
        files = ("config.json", "model.safetensors.index.json", "tokenizer.json", "chat_template.json",
                 "preprocessor_config.json", "modeling_llavaonevision1_5.py")
    for name in files:
        assert (folder / name).is_file(), name
    model, processor = loaded_tiny[family]
    fresh, _ = build_tiny(family)  # same seed: same weights as the saved model
    for (name, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert json.loads((folder / "config.json").read_text())["model_type"] in FAMILY_SPECS[family].model_types
    assert processor.chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_layer_is_at_least_64_wide(loaded_tiny, family):
    # bitsandbytes packs 4-bit weights in blocks of 64 input features; a narrower input
    # fails at the first forward. (Grouped-query k/v outputs may be narrower: that is fine.)
    model, _ = loaded_tiny[family]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    narrow = [(n, m.in_features) for n, m in linears if m.in_features < 64 or m.in_features % 64]
    assert not narrow, narrow


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_words_are_single_tokens(loaded_tiny, family):
    from hpc_train.data.sources.synthetic import COLOURS, PITCHES

    tokenizer = loaded_tiny[family][1].tokenizer
    for word in [*COLOURS, *PITCHES]:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
        assert len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1, word


@pytest.mark.parametrize("family", FAMILIES)
def test_module_groups_cover_every_parameter(loaded_tiny, family):
    model, _ = loaded_tiny[family]
    groups = FAMILY_SPECS[family].module_groups
    for name, _ in model.named_parameters():
        owners = [g for g, prefixes in groups.items() if name.startswith(prefixes)]
        assert len(owners) == 1, (name, owners)


def test_family_mismatch_with_folder_is_explained(tiny_model_dirs):
    cfg = ModelConfig(family="llava_onevision", path=str(tiny_model_dirs["smolvlm"]))
    with pytest.raises(ConfigError, match="model_type 'idefics3' is the smolvlm family.*model.family=smolvlm"):
        model_family(cfg)


def test_folder_without_config_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="no config.json there.*make-tiny"):
        load_model_and_processor(ModelConfig(family="smolvlm", path=str(tmp_path)))


def test_published_preset_gets_a_matching_offline_processor():
    from hpc_train.models.presets import get_preset
    from hpc_train.models.tiny import preset_processor

    processor = preset_processor("smolvlm-256m")
    preset = get_preset("smolvlm-256m")
    assert processor.image_seq_len == preset.tokens_per_image
    assert processor.image_processor.max_image_size["longest_edge"] == preset.image_size
    vocab = preset.build_config().text_config.vocab_size
    assert len(processor.tokenizer) < vocab  # every id the tokenizer makes is a row of the embedding


def test_unknown_or_mismatched_preset_is_refused():
    from hpc_train.config_file import load_config
    from hpc_train.models.load import model_family

    with pytest.raises(ConfigError, match="did you mean 'smolvlm-256m'"):
        model_family(load_config(None, ["model.preset=smolvlm-265m"]).model)
    assert model_family(load_config(None, ["model.preset=llava-onevision-0.5b"]).model).name == "llava_onevision"
    with pytest.raises(ConfigError, match="set model.family=llava_onevision, or leave it out"):
        model_family(load_config(None, ["model.preset=llava-onevision-0.5b", "model.family=smolvlm"]).model)
