"""FLOPs counting from the architecture, and the peak-rate table."""

from __future__ import annotations

import pytest
import torch

from hpc_train.models.adapters import group_of
from hpc_train.models.families import get_family
from profiling.flops import (
    ModelShape,
    Trainability,
    TransformerShape,
    UnknownArchitecture,
    VisionWork,
    grid_work,
    mfu,
    peak_tflops,
    shape_of,
    step_flops,
)
from tests.conftest import FAMILIES


def linear_weights(model: torch.nn.Module, family: str) -> dict[str, int]:
    """Weights of every nn.Linear per component, as the model really has them."""
    sizes: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            group = group_of(name + ".weight", get_family(family))
            sizes[group] = sizes.get(group, 0) + module.weight.numel()
    return sizes


@pytest.mark.parametrize("family", FAMILIES)
def test_matmul_counts_match_the_models_linear_layers(loaded_tiny, family):
    model = loaded_tiny[family][0]
    shape = shape_of(model.config)
    real = linear_weights(model, family)
    assert shape.text.matmul_params() == real["llm"]
    assert shape.vision.matmul_params() == real["vision"]
    assert shape.text.hidden * shape.vocab == real["head"]
    rows = shape.vision_tokens_per_image
    if family in ("smolvlm", "smolvlm2"):  # the connector's linear runs once per pixel-shuffled token
        rows //= model.config.scale_factor ** 2
    if family == "llava_onevision_1_5":  # the merger's MLP runs once per 2x2 window
        rows //= model.config.vision_config.spatial_merge_size ** 2
    assert shape.connector_flops_per_image == 2 * real["connector"] * rows


def test_a_grid_tower_counts_the_patch_rows_and_segments_it_ran(loaded_tiny):
    """LLaVA-OneVision-1.5 encodes each image at its own size, each frame its own attention
    segment: its FLOPs follow the rows and the per-segment rows squared, not an image count."""
    model = loaded_tiny["llava_onevision_1_5"][0]
    shape, real = shape_of(model.config), linear_weights(model, "llava_onevision_1_5")
    work = grid_work(torch.tensor([[1, 4, 6], [3, 2, 2]]))  # an image, and a 3-frame video
    assert work == VisionWork(images=4, rows=24 + 3 * 4, pairs=24 ** 2 + 3 * 4 ** 2)
    flops = step_flops(shape, Trainability(), tokens=0, samples=1, images=work.images,
                       vision_rows=work.rows, vision_pairs=work.pairs)
    vision = model.config.vision_config
    patch_embed = 3 * 14 * 14 * vision.hidden_size
    expected = (2 * (real["vision"] + patch_embed) * work.rows + 4 * vision.depth * vision.hidden_size * work.pairs
                + 2 * real["connector"] * work.rows / 4)
    assert flops.forward == pytest.approx(expected)


def test_published_smolvlm_counts_match_its_parameter_count():
    from hpc_train.models.presets import count_parameters, get_preset

    shape = shape_of(get_preset("smolvlm-256m").build_config())
    counts = count_parameters("smolvlm-256m")
    text = shape.text
    # besides the matmuls, the language model has its input embedding and 2 norms per layer + 1
    assert counts["llm"] + counts["head"] == (text.matmul_params() + 2 * text.hidden * shape.vocab
                                              + (2 * text.layers + 1) * text.hidden)
    # the vision tower's other weights: position embeddings, biases, norms
    assert 0.98 < (shape.vision.matmul_params() + shape.patch_embed_params) / counts["vision"] < 1.0


SMALL = ModelShape(text=TransformerShape(layers=2, hidden=8, q_dim=8, kv_dim=4, intermediate=16,
                                         gated_mlp=True, causal=True), vocab=10,
                   vision=TransformerShape(layers=1, hidden=4, q_dim=4, kv_dim=4, intermediate=8,
                                           gated_mlp=False, causal=False),
                   vision_tokens_per_image=9, patch_embed_params=12, connector_flops_per_image=100.0)


def test_forward_flops_by_hand():
    flops = step_flops(SMALL, Trainability(), tokens=20, samples=2, images=3)
    text_params = 2 * (8 * (8 + 8) + 8 * 8 + 3 * 8 * 16)  # per layer: q,k,v,o + gate/up/down
    text = 2 * text_params * 20 + 4 * 2 * 8 * (10 / 2) * 20  # causal: a token sees half of 10
    head = 2 * 8 * 10 * 20
    vision_params = 4 * (4 + 8) + 4 * 4 + 2 * 4 * 8 + 12
    vision = (2 * vision_params * 9 + 4 * 1 * 4 * 9 * 9) * 3
    assert flops.forward == pytest.approx(text + head + vision + 100.0 * 3)
    assert flops.backward == 0  # evaluation: nothing trains


def test_backward_follows_what_trains():
    counts = {"tokens": 512, "samples": 4, "images": 8}
    full = step_flops(SMALL, Trainability(trains=frozenset({"vision", "connector", "llm", "head"})), **counts)
    frozen_vision = step_flops(SMALL, Trainability(trains=frozenset({"connector", "llm", "head"})), **counts)
    lora = step_flops(SMALL, Trainability(lora_params={"llm": 64}), **counts)
    # activation gradients (1x forward, 2x for attention: scores and values both need them)
    # plus weight gradients (the matmul part)
    text_params = 2 * (8 * (8 + 8) + 8 * 8 + 3 * 8 * 16)
    matmuls = 2 * text_params * 512 + 2 * 8 * 10 * 512 + (2 * (4 * 12 + 16 + 64 + 12) * 9 + 100.0) * 8
    attention = 4 * 2 * 8 * (512 / 4 / 2) * 512 + 4 * 1 * 4 * 9 * 9 * 8
    assert full.backward == pytest.approx(full.forward + attention + matmuls)
    assert frozen_vision.backward < full.backward
    # LoRA on the language model: activation gradients through llm and head, adapters' own work
    no_vision = step_flops(SMALL, Trainability(), tokens=512, samples=4, images=0).forward
    text_attention = 4 * 2 * 8 * (512 / 4 / 2) * 512
    assert lora.forward - full.forward == pytest.approx(2 * 64 * 512)
    assert lora.backward == pytest.approx(no_vision + text_attention + 4 * 64 * 512)


def test_lora_on_the_smolvlm_connector_counts_its_pixel_shuffled_rows(loaded_tiny):
    config = loaded_tiny["smolvlm"][0].config
    shape = shape_of(config)
    assert shape.connector_tokens_per_image == shape.vision_tokens_per_image // config.scale_factor ** 2
    base = step_flops(shape, Trainability(), tokens=100, samples=2, images=3)
    adapted = step_flops(shape, Trainability(lora_params={"connector": 10}), tokens=100, samples=2, images=3)
    assert adapted.forward - base.forward == pytest.approx(2 * 10 * 3 * shape.connector_tokens_per_image)


@pytest.mark.parametrize(("name", "dtype", "expected"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("NVIDIA H200", "fp16", 989.4), ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.05), ("NVIDIA H100 NVL", "bf16", None), ("NVIDIA GeForce RTX 4090", "bf16", None),
    (None, "bf16", None), ("cpu", "fp32", None),
])
def test_peak_table_names_only_what_it_knows(name, dtype, expected):
    peak = peak_tflops(name, dtype)
    assert peak.tflops == expected
    assert peak.source.startswith("unknown") == (expected is None)


@pytest.mark.parametrize(("name", "expected", "share"), [
    ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 312.0 * 3 / 7, "3/7"), ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 989.4 / 7, "1/7"),
    ("NVIDIA A30 MIG 2g.12gb", None, None),  # no A30 datasheet row: unknown, not a whole GPU's peak
])
def test_a_mig_slice_gets_its_share_of_the_gpus_peak(name, expected, share):
    peak = peak_tflops(name, "bf16")
    assert peak.tflops == (None if expected is None else pytest.approx(expected, abs=0.01))
    assert share is None or f"x {share} (a MIG slice)" in peak.source


def test_mfu_is_left_out_when_the_peak_is_unknown():
    assert mfu(1e15, 1.0, 2, peak_tflops("NVIDIA H100 NVL", "bf16")) is None
    assert mfu(989.4e12, 1.0, 2, peak_tflops("NVIDIA H100 80GB HBM3", "bf16")) == pytest.approx(0.5)


def test_unknown_architectures_are_refused():
    from types import SimpleNamespace

    with pytest.raises(UnknownArchitecture, match="gpt2"):
        shape_of(SimpleNamespace(model_type="gpt2"))
