"""Sequence parallelism over LLaVA-OneVision-1.5's patch grids: each rank of a group encodes whole
images or its share of every video's frames, and the rows it encodes are exactly the whole
batch's features it is said to encode (so the all-to-all puts every row where its token is)."""

from __future__ import annotations

import pytest
import torch

from hpc_train.data.decoding.media_share import share_bounds, split_media
from hpc_train.models.families.llava_onevision_1_5 import tiny_config
from hpc_train.models.llava_ov_1_5 import LlavaOnevision15ForConditionalGeneration
from hpc_train.models.tiny import build_tiny
from hpc_train.plan.step_time import hungriest_share
from hpc_train.plan.worst_batch import PlannedBatch, _grid_work

GRIDS = {"image_grid_thw": [[1, 4, 6], [1, 2, 2], [1, 6, 4]], "video_grid_thw": [[3, 4, 4], [1, 2, 4], [5, 2, 2]]}
PIXELS = {"image_grid_thw": "pixel_values", "video_grid_thw": "pixel_values_videos"}


@pytest.fixture(scope="module")
def tower() -> torch.nn.Module:
    _, processor = build_tiny("llava_onevision_1_5")
    torch.manual_seed(0)
    return LlavaOnevision15ForConditionalGeneration(tiny_config(processor.tokenizer, 64)).visual.eval()


def batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    out = {}
    for key, grid in GRIDS.items():
        out[key] = torch.tensor(grid)
        out[PIXELS[key]] = torch.randn(sum(t * h * w for t, h, w in grid), 588)
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_each_rank_encodes_exactly_the_rows_it_is_said_to(tower, size):
    whole = batch()
    with torch.no_grad():
        features = {kind: tower(whole[PIXELS[key]], whole[key])
                    for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw"))}
    wanted = {kind: tuple(torch.arange(*share_bounds(len(rows), q, size)) for q in range(size))
              for kind, rows in features.items()}
    rows_encoded = []
    for rank in range(size):
        mine = batch()
        shares = split_media(mine, rank, size, wanted)
        with torch.no_grad():
            for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
                encoded = shares[kind].encoded
                assert torch.equal(torch.sort(torch.cat(encoded)).values, torch.arange(len(features[kind])))
                local = tower(mine[PIXELS[key]], mine[key])
                if len(encoded[rank]):
                    assert torch.allclose(local, features[kind][encoded[rank]], atol=1e-5), (kind, rank)
                else:  # no share: one frame or image, times zero in the model
                    assert int(mine[key][:, 0].sum()) == 1
        rows_encoded.append(len(mine["pixel_values"]) + len(mine["pixel_values_videos"]))
    planned = PlannedBatch(batch=batch(), indices=[], tokens=0, real_tokens=0, tiles=0, vision=_grid_work(batch()))
    assert hungriest_share(planned, size).rows == max(rows_encoded)  # the planned step time's rank
