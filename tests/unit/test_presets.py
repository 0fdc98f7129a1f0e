"""Published-architecture presets: sizes match the model cards, built offline."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_train.errors import ConfigError
from hpc_train.models.presets import GROUPS, PRESETS, build_model, count_parameters, get_preset

NAMES = sorted(PRESETS)


@pytest.fixture(scope="module")
def counts() -> dict[str, dict[str, int]]:
    """count_parameters of every preset (meta device: no memory), computed once."""
    return {name: count_parameters(name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_total_is_within_2_percent_of_the_published_count(counts, name):
    actual = counts[name]["total"]
    expected = PRESETS[name].published_params
    off = actual / expected - 1
    assert abs(off) <= 0.02, (
        f"{name}: built {actual:,} parameters, model card publishes {expected:,} ({off:+.2%})"
    )


@pytest.mark.parametrize("name", NAMES)
def test_groups_add_up_to_the_total_and_none_is_empty(counts, name):
    count = counts[name]
    assert set(count) == {"total", *GROUPS}
    assert sum(count[g] for g in GROUPS) == count["total"]
    tied = get_preset(name).build_config().tie_word_embeddings
    for group in GROUPS:
        if group == "head" and tied:
            # A tied head is the input embedding: counted once, under llm.
            assert count[group] == 0, name
        else:
            assert count[group] > 0, f"{name}: group {group} is empty"


@pytest.mark.parametrize("name", NAMES)
def test_token_costs_follow_from_the_config(name):
    preset = get_preset(name)
    config = preset.build_config()
    vision = config.vision_config
    if preset.family == "llava_onevision_1_5":  # each image at its own size: the preset's is the planning square's
        from PIL import Image

        from hpc_train.models.tiny import preset_processor

        side = preset.image_size
        grid = preset_processor(name).image_processor(images=[Image.new("RGB", (side, side))])["image_grid_thw"]
        merged = int(grid[0].prod()) // vision.spatial_merge_size**2
        assert preset.tokens_per_image == preset.tokens_per_video_frame == merged == (side // vision.patch_size) ** 2 // 4
        return
    assert vision.image_size == preset.image_size
    patches = (vision.image_size // vision.patch_size) ** 2
    if preset.family in ("smolvlm", "smolvlm2"):
        # Pixel shuffle folds scale x scale patches into one token; a video frame is one tile.
        assert preset.tokens_per_image == patches // config.scale_factor**2
        assert preset.tokens_per_video_frame == preset.tokens_per_image
    else:
        # Full feature map a tile; video frames are pooled 2x2 (rounding up).
        assert preset.tokens_per_image == patches
        assert preset.tokens_per_video_frame == math.ceil(math.isqrt(patches) / 2) ** 2


def test_build_config_returns_a_fresh_config_each_time():
    first = get_preset("smolvlm-256m").build_config()
    first.text_config.num_hidden_layers = 1
    assert get_preset("smolvlm-256m").build_config().text_config.num_hidden_layers == 30


def test_unknown_preset_suggests_the_closest_name():
    with pytest.raises(ConfigError) as err:
        get_preset("smolvlm-265m")
    message = str(err.value)
    assert "did you mean 'smolvlm-256m'" in message
    for name in NAMES:
        assert name in message


def test_meta_build_allocates_nothing():
    model = build_model("llava-onevision-7b", device="meta", dtype=torch.bfloat16)
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert all(p.dtype == torch.bfloat16 for p in params)


@pytest.mark.slow
def test_smallest_preset_runs_a_forward_pass_with_one_image():
    preset = get_preset("smolvlm-256m")
    model = build_model(preset.name, device="cpu", dtype=torch.bfloat16).eval()
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    size_gb = sum(p.numel() * p.element_size() for p in params) / 1e9
    assert 0.45 < size_gb < 0.55, size_gb

    # This CPU family (AVX2) has no bf16 matrix units: a bf16 forward takes ~20 s here, fp32
    # ~5 s, and the shapes under test are the same in either dtype.
    model = model.float()
    config = model.config
    image = [config.image_token_id] * preset.tokens_per_image
    input_ids = torch.tensor([[1, 10, 11, *image, 12, 13]])
    pixel_values = torch.randn(1, 1, 3, preset.image_size, preset.image_size)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids)

    assert out.logits.shape == (1, input_ids.shape[1], config.text_config.vocab_size)
    # One tile's worth of image features that reach the language model.
    hidden = config.text_config.hidden_size
    assert _image_features(out).reshape(-1, hidden).shape == (preset.tokens_per_image, hidden)
    assert torch.isfinite(out.loss)


def _image_features(out) -> torch.Tensor:
    """The connector's output, from either transformers layout: up to 5.23 ``image_hidden_states``
    (one tensor); from 5.24 ``image_outputs.pooler_output`` (a tensor per sample), where
    ``image_hidden_states`` is deprecated and is to become the per-layer vision states."""
    image_outputs = getattr(out, "image_outputs", None)
    if image_outputs is None:
        return out.image_hidden_states
    pooled = image_outputs.pooler_output
    return torch.cat(list(pooled)) if isinstance(pooled, list | tuple) else pooled
