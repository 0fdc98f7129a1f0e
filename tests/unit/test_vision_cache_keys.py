"""When a run may use cached vision features, and what their keys cover: the tower's and the
connector's weights (not the language model's, not an adapter around it), the media settings
and the processor's."""

from __future__ import annotations

import pytest
import torch

from hpc_train.config_file import load_config
from hpc_train.data.caches.vision_cache_keys import (
    cache_refusal,
    processing_digest,
    vision_weights_digest,
)
from hpc_train.models.load import model_family
from hpc_train.models.tiny import build_tiny
from hpc_train.train.trainable_model import prepare_for_training
from tests.conftest import TINY_RECIPES as RECIPES

FAMILIES = list(RECIPES)


def prepared(family: str, *overrides: str):
    config = load_config(RECIPES[family], ["data.eval=null", "model.dtype=fp32", "train.device=cpu", *overrides])
    model, processor = build_tiny(family)
    return prepare_for_training(model, config, model_family(config.model)), processor, config


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("overrides,moving", [
    (["train.mode=lora", "lora.target=llm"], None),
    (["train.mode=qlora", "lora.target=llm"], None),
    (["train.mode=full", "model.freeze=[vision,connector]"], None),
    (["train.mode=full", "model.freeze=[vision]"], "connector (trained)"),
    (["train.mode=full"], "vision (trained) and the connector (trained)"),
    (["train.mode=lora", "lora.target=llm+connector"], "connector (LoRA)"),
    (["train.mode=lora", "lora.target=all"], "vision (LoRA) and the connector (LoRA)"),
])
def test_the_cache_is_refused_with_a_reason_while_the_tower_or_connector_moves(family, overrides, moving):
    if "train.mode=qlora" in overrides:
        pytest.importorskip("bitsandbytes")
    model, _, config = prepared(family, *overrides)
    said = cache_refusal(model, model_family(config.model))
    if moving is None:
        assert said is None
    else:
        assert said is not None and f"the {moving} change the cached features" in said and "Fix" in said


@pytest.mark.parametrize("family", FAMILIES)
def test_the_weights_digest_follows_the_tower_and_connector_only(family):
    plain, _, config = prepared(family, "train.mode=full", "model.freeze=[vision,connector]")
    fam = model_family(config.model)
    digest = vision_weights_digest(plain, fam)
    wrapped, _, _ = prepared(family, "train.mode=lora", "lora.target=llm")  # same seed: the same weights
    assert vision_weights_digest(wrapped, fam) == digest
    with torch.no_grad():
        plain.get_input_embeddings().weight.add_(1.0)  # the language model: no effect
        assert vision_weights_digest(plain, fam) == digest
        tower = next(p for n, p in plain.named_parameters() if n.startswith(fam.module_groups["vision"]))
        tower.view(-1)[0] += 1e-3
        assert vision_weights_digest(plain, fam) != digest
        tower.view(-1)[0] -= 1e-3
        connector = next(p for n, p in plain.named_parameters() if n.startswith(fam.module_groups["connector"]))
        connector.view(-1)[0] += 1e-3
        assert vision_weights_digest(plain, fam) != digest


def test_the_processing_digest_follows_media_and_processor_settings():
    _, processor, config = prepared("smolvlm")
    digest = processing_digest(config.data, processor)
    assert processing_digest(config.data, processor) == digest
    for override in ("data.image.max_side=128", "data.image.aspect_4to1=true", "data.video.fps=2",
                     "data.video.sampling=fps", "data.video.num_frames=5", "data.audio.image_size=32"):
        changed = load_config(RECIPES["smolvlm"], ["data.eval=null", override]).data
        assert processing_digest(changed, processor) != digest, override
    processor.image_processor.do_image_splitting = not processor.image_processor.do_image_splitting
    assert processing_digest(config.data, processor) != digest
