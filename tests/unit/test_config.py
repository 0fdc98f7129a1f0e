"""RunConfig: YAML + overrides, strict keys with suggestions, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_train.config import RunConfig
from hpc_train.config_file import RECIPES_DIR, load_config, save_config, valid_keys
from hpc_train.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "model:\n  preset: tiny\ndata:\n  max_seq_len: 256\n")
    cfg = load_config(path, ["data.max_seq_len=1024", "train.lr=3e-4", "data.video.sampling=fps",
                             "data.eval=null", "data.image.aspect_4to1=yes"])
    assert cfg.data.max_seq_len == 1024
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.video.sampling == "fps"
    assert cfg.data.image.aspect_4to1 is True
    assert cfg.data.eval is None


def test_misspelt_yaml_key_names_file_line_and_closest_key(tmp_path):
    path = write(tmp_path, "model:\n  preset: tiny\ndata:\n  train: a.jsonl\n  max_seq_lenght: 12\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:5" in message
    assert "'data.max_seq_lenght'" in message
    assert "did you mean 'data.max_seq_len'" in message


def test_misspelt_override_suggests_key():
    with pytest.raises(ConfigError, match=r"override 'trian.lr=1'.*did you mean 'train.lr'"):
        load_config(None, ["model.preset=tiny", "trian.lr=1"])


def test_nested_unknown_key_suggests_sibling():
    with pytest.raises(ConfigError, match=r"data.video.num_frame.*did you mean 'data.video.num_frames'"):
        load_config(None, ["model.preset=tiny", "data.video.num_frame=4"])


def test_bad_value_names_key_and_source(tmp_path):
    path = write(tmp_path, "model:\n  preset: tiny\ntrain:\n  mode: qlorra\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:4" in str(err.value) and "train.mode" in str(err.value)
    with pytest.raises(ConfigError, match=r"override 'data.max_seq_len=-3'.*data.max_seq_len"):
        load_config(path, ["train.mode=lora", "data.max_seq_len=-3"])


def test_override_without_equals_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["data.max_seq_len"])
    path = write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: not valid YAML"):
        load_config(path)


def test_model_source_must_be_exactly_one():
    with pytest.raises(ConfigError, match="exactly one of model.path"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="exactly one of model.path"):
        load_config(None, ["model.preset=tiny", "model.path=/x"])


def test_video_frame_bounds_checked():
    with pytest.raises(ConfigError, match="num_frames .* exceeds data.video.max_frames"):
        load_config(None, ["model.preset=tiny", "data.video.num_frames=40", "data.video.max_frames=8"])


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match="tiny_smolvlm"):
        load_config("no_such_recipe")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.name == recipe


def test_save_round_trip_and_digest(tmp_path):
    cfg = load_config("tiny_smolvlm", ["train.lr=0.01"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert again.digest() == cfg.digest()
    assert load_config("tiny_smolvlm").digest() != cfg.digest()


def test_valid_keys_cover_nested_sections():
    keys = valid_keys()
    assert "data.video.fps" in keys and "train.micro_batch_size" in keys
    assert all(k.split(".")[0] in RunConfig.model_fields for k in keys)




def test_every_setting_knows_where_it_was_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\ndata:\n  train: a.jsonl\n  media_root: media/\n")
    cfg = load_config(path, ["data.train=b.jsonl"])
    assert cfg.origin("data.media_root") == f"{path}:5" and cfg.origin("data.train") == "override 'data.train=b.jsonl'"
    assert cfg.origin("data.eval") is None
    note = cfg.mixed_origin_note("data.media_root", "data.train")
    assert note == f"data.media_root was set by {path}:5, but data.train by override 'data.train=b.jsonl'"
    assert load_config(path).mixed_origin_note("data.media_root", "data.train") is None
    both = load_config(path, ["data.train=b.jsonl", "data.media_root=m/"])
    assert both.mixed_origin_note("data.media_root", "data.train") is None
    assert both == load_config(None, ["model.preset=tiny", "data.train=b.jsonl", "data.media_root=m/"])
