"""The RICE-ViT tower of LLaVA-OneVision-1.5 (issue 34, first part): the hub checkpoint's parameter
names and shapes, one segment per image or frame, the processor's patch rows in, one row per 2×2
window out. (Exactness against the reference implementation comes with the family.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hpc_train.models.rice_vit import RiceVisionTower, RiceVitConfig


def hub_shapes(text: int) -> dict[str, tuple[int, ...]]:
    """``visual.*`` of lmms-lab/LLaVA-OneVision-1.5-{4B,8B}-Instruct (../shared notes: the
    reference's modeling file and conversion configs)."""
    shapes = {"patch_embed.proj.weight": (1024, 3, 14, 14), "class_embedding": (1024,), "class_pos_emb": (1, 32),
              "pre_layernorm.weight": (1024,), "pre_layernorm.bias": (1024,),
              "merger.ln_q.weight": (1024,), "merger.ln_q.bias": (1024,), "merger.mlp.0.weight": (4096, 4096),
              "merger.mlp.0.bias": (4096,), "merger.mlp.2.weight": (text, 4096), "merger.mlp.2.bias": (text,)}
    for n in range(24):
        for name, shape in {"norm1.weight": (1024,), "norm1.bias": (1024,), "attn.qkv.weight": (3072, 1024),
                            "attn.qkv.bias": (3072,), "attn.proj.weight": (1024, 1024), "attn.proj.bias": (1024,),
                            "norm2.weight": (1024,), "norm2.bias": (1024,), "mlp.fc1.weight": (4096, 1024),
                            "mlp.fc1.bias": (4096,), "mlp.fc2.weight": (1024, 4096), "mlp.fc2.bias": (1024,)}.items():
            shapes[f"blocks.{n}.{name}"] = shape
    return shapes


@pytest.mark.parametrize(("text", "total"), [(4096, 302_914_592 + 33_564_672), (2560, 302_914_592 + 27_271_680)])
def test_the_published_tower_has_the_checkpoint_s_names_and_shapes(text, total):
    with torch.device("meta"):
        tower = RiceVisionTower(RiceVitConfig(text_hidden_size=text))
    assert {k: tuple(v.shape) for k, v in tower.state_dict().items()} == hub_shapes(text)  # inv_freq is not saved
    assert sum(p.numel() for p in tower.parameters()) == total


def tiny() -> RiceVisionTower:
    torch.manual_seed(0)
    config = RiceVitConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, text_hidden_size=48)
    return RiceVisionTower(config).eval()


def processed(*images: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    out = Qwen2VLImageProcessor(temporal_patch_size=1, min_pixels=28 * 28, max_pixels=112 * 112)(
        images=list(images), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def picture(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_the_processor_s_rows_become_one_row_per_window():
    rows, grid = processed(picture(1, 56, 84), picture(2, 28, 28))
    assert grid.tolist() == [[1, 4, 6], [1, 2, 2]] and rows.shape == (28, 588)
    with torch.no_grad():
        assert tiny()(rows, grid).shape == (6 + 1, 48)


def test_each_image_and_frame_attends_only_to_itself():
    tower = tiny()
    rows, grid = processed(picture(1, 56, 56), picture(2, 56, 56))
    video = torch.tensor([[2, 4, 4]])  # the same rows as a 2-frame video: frames are separate segments too
    with torch.no_grad():
        both = tower(rows, grid)
        changed = rows.clone()
        changed[16:] += 1.0
        after = tower(changed, grid)
        assert torch.equal(tower(rows, video), both)
    assert torch.equal(after[:4], both[:4]) and not torch.allclose(after[4:], both[4:])


def test_the_class_token_and_its_angles_take_part():
    tower = tiny()
    rows, grid = processed(picture(3, 56, 56))
    with torch.no_grad():
        before = tower(rows, grid)
        tower.class_pos_emb.add_(1.0)
        moved = tower(rows, grid)
        tower.class_embedding.add_(1.0)
        again = tower(rows, grid)
    assert not torch.allclose(before, moved) and not torch.allclose(moved, again)
