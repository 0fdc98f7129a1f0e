"""A LLaVA-OneVision-1.5 folder as published: read as data (its remote code never runs), every
weight in place or the load refused, written back in the same layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hpc_train.config import ModelConfig
from hpc_train.errors import ConfigError
from hpc_train.models.load import load_model_and_processor


def test_the_published_layout_loads_our_classes_without_running_its_code(tiny_model_dirs, loaded_tiny):
    folder = tiny_model_dirs["llava_onevision_1_5"]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] and (folder / "modeling_llavaonevision1_5.py").is_file()  # it would raise if run
    model, processor = loaded_tiny["llava_onevision_1_5"]
    assert type(model).__module__ == "hpc_train.models.llava_ov_1_5"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.video_processor.temporal_patch_size == 1  # read from preprocessor_config.json
    assert torch.equal(model.visual.inv_freq, model.visual.rotary_frequencies())  # not in the file: rebuilt


@pytest.mark.parametrize("change", ["rename", "drop"])
def test_a_weight_the_model_has_no_place_for_or_lacks_is_refused(tiny_model_dirs, tmp_path, change):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["llava_onevision_1_5"], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["visual.class_embedding"]
    tensors = load_file(shard)
    moved = tensors.pop("visual.class_embedding")
    if change == "rename":  # the transformers PR's names, say
        tensors["model.visual.class_embedding"] = moved
        index["weight_map"]["model.visual.class_embedding"] = shard.name
    del index["weight_map"]["visual.class_embedding"]
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError) as error:
        load_model_and_processor(ModelConfig(path=str(folder)))
    message = str(error.value)
    assert "missing from its weights (they would stay random): visual.class_embedding" in message
    assert ("in its weights but not in the model (they would be dropped): model.visual.class_embedding" in message) \
        == (change == "rename")
    assert "Fix: point model.path at the checkpoint folder as published" in message


def test_a_saved_model_keeps_the_hub_s_config_names(loaded_tiny, tmp_path):
    """What the upstream code (transformers 4) reads: the text config's own model_type and
    rope_theta, the top-level vocab_size its loss uses, the architecture's name."""
    model, _ = loaded_tiny["llava_onevision_1_5"]
    model.save_pretrained(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    assert saved["model_type"] == "llavaonevision1_5"
    assert saved["architectures"] == ["LLaVAOneVision1_5_ForConditionalGeneration"]
    assert saved["text_config"]["model_type"] == "LLaVAOneVision1_5_text"
    assert saved["text_config"]["rope_theta"] == model.config.text_config.rope_parameters["rope_theta"]
    assert saved["vocab_size"] == model.config.text_config.vocab_size
    assert saved["vision_config"]["text_hidden_size"] == model.config.text_config.hidden_size
    assert set(load_file(tmp_path / "export" / "model.safetensors")) == set(model.state_dict()) - {"visual.inv_freq",
                                                                                                   "model.rotary_emb.inv_freq"}


def test_check_data_passes_on_the_published_folder(tiny_model_dirs, synthetic_data, capsys):
    from hpc_train.cli import main

    folder = tiny_model_dirs["llava_onevision_1_5"]
    assert main(["check-data", "tiny_llava_onevision_1_5", f"model.path={folder}", "model.preset=null",
                 f"data.train={synthetic_data / 'train.jsonl'}", "data.eval=null"]) == 0
    out = capsys.readouterr().out
    assert "with errors: 0" in out and "You are a helpful assistant.<|im_end|>" in out  # the template's own
    assert "<|vision_start|><|" in out
