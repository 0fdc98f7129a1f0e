"""Who decodes and encodes which media under sequence parallelism: every video frame and image
tile exactly once over the group, each rank's pixels being the ones it encodes."""

from __future__ import annotations

import pytest
import torch

from hpc_train.data.batching.collate import Collator
from hpc_train.data.batching.sequence_shard import SHARD, shard_batch
from hpc_train.data.decoding.media_share import TILE_FRAMES, frame_owners, share_bounds
from hpc_train.models.families import get_family
from hpc_train.models.sequence_parallel import media_token_ids

from ..conftest import mixed_samples


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_frame_owners_inverts_the_shares(size):
    for frames in range(1, 20):
        owners = frame_owners(torch.arange(frames), torch.full((frames,), frames), size)
        expected = [r for r in range(size) for _ in range(*share_bounds(frames, r, size))]
        assert owners.tolist() == expected, frames


def _sharded(loaded_tiny, synthetic_data, family, size):
    _, processor = loaded_tiny[family]
    samples = mixed_samples(loaded_tiny, synthetic_data, family)
    samples = [s for s in samples if family == "smolvlm" or "pixel_values_videos" in s.media or not s.media]
    batch = Collator(get_family(family), processor.tokenizer.pad_token_id)(samples)
    tokens = media_token_ids(loaded_tiny[family][0].config, family)
    return batch, [shard_batch(dict(batch), rank=r, size=size, pad_token_id=0, media_tokens=tokens)
                   for r in range(size)]


@pytest.mark.parametrize("size", [2, 3])
def test_smolvlm_ranks_hold_each_real_tile_once_and_encode_the_rows_they_say(loaded_tiny, synthetic_data, size):
    batch, shards = _sharded(loaded_tiny, synthetic_data, "smolvlm", size)
    tags = batch[TILE_FRAMES].flatten(0, 1)
    real = batch["pixel_values"].flatten(0, 1)[tags[:, 0] != -2]
    video = (tags[tags[:, 0] != -2][:, 0] >= 0)
    assert video.any() and (~video).any()  # the batch has video frames and images
    rows = [s[SHARD].feature_rows["image"] for s in shards]
    encoded = [r.encoded[s[SHARD].rank] for r, s in zip(rows, shards, strict=True)]
    per_tile = int((batch["input_ids"] == media_token_ids(loaded_tiny["smolvlm"][0].config, "smolvlm")["image"]).sum()
                   ) // len(real)
    assert sorted(torch.cat(encoded).tolist()) == list(range(len(real) * per_tile))
    for shard, rows_here in zip(shards, encoded, strict=True):
        tiles = rows_here[::per_tile] // per_tile
        assert torch.equal(shard["pixel_values"][0], real[tiles])  # exactly the tiles it encodes, in order
        assert TILE_FRAMES not in shard
    assert all(list(map(torch.Tensor.tolist, r.encoded)) == list(map(torch.Tensor.tolist, rows[0].encoded))
               for r in rows)  # every rank agrees who encodes what


def test_llava_ranks_encode_their_frames_of_every_video_and_the_last_one_its_newline(loaded_tiny, synthetic_data):
    size = 2
    batch, shards = _sharded(loaded_tiny, synthetic_data, "llava_onevision", size)
    videos, frames = batch["pixel_values_videos"].shape[:2]
    rows = [s[SHARD].feature_rows["video"] for s in shards]
    token = media_token_ids(loaded_tiny["llava_onevision"][0].config, "llava_onevision")["video"]
    assert sorted(torch.cat(rows[0].encoded).tolist()) == list(range(int((batch["input_ids"] == token).sum())))
    kept = torch.cat([s["pixel_values_videos"][0] for s in shards])
    per_rank = [share_bounds(frames, r, size) for r in range(size)]
    expected = torch.cat([batch["pixel_values_videos"][:, a:b].flatten(0, 1) for a, b in per_rank])
    assert torch.equal(kept, expected)
    per_frame = (int((batch["input_ids"] == token).sum()) // videos - 1) // frames
    for r, (a, b) in enumerate(per_rank):  # the tower's newline row goes after each video's last frame
        order = rows[r].local_order
        assert len(order) == len(rows[r].encoded[r])
        at = (order == videos * (b - a) * per_frame).nonzero().squeeze(1).tolist()
        assert at == ([(v + 1) * ((b - a) * per_frame + 1) - 1 for v in range(videos)] if b == frames else [])


def test_a_one_frame_video_is_encoded_by_one_rank_newline_included(loaded_tiny, synthetic_data):
    _, processor = loaded_tiny["llava_onevision"]
    text = [s for s in mixed_samples(loaded_tiny, synthetic_data, "llava_onevision") if not s.media]
    from hpc_train.config import DataConfig
    from hpc_train.data.pipeline import build_pipeline

    pipeline = build_pipeline(DataConfig(), processor, get_family("llava_onevision"))
    batch = pipeline.collator()(text)  # a text-only batch gets the blank one-frame video
    assert batch["pixel_values_videos"].shape[1] == 1
    tokens = media_token_ids(loaded_tiny["llava_onevision"][0].config, "llava_onevision")
    shards = [shard_batch(dict(batch), rank=r, size=3, pad_token_id=0, media_tokens=tokens) for r in range(3)]
    encoded = shards[0][SHARD].feature_rows["video"].encoded
    assert len(encoded[0]) == int((batch["input_ids"] == tokens["video"]).sum()) and not any(map(len, encoded[1:]))
    orders = [s[SHARD].feature_rows["video"].local_order for s in shards]
    assert orders[0][-1] == len(orders[0]) - 1 and all(len(o) and o.max() < len(orders[0]) - 1 for o in orders[1:])


@pytest.mark.parametrize("size", [2, 3])
def test_llava_ranks_encode_whole_samples_images_into_the_rows_they_say(loaded_tiny, synthetic_data, size):
    model, processor = loaded_tiny["llava_onevision"]
    samples = [s for s in mixed_samples(loaded_tiny, synthetic_data, "llava_onevision")
               if "pixel_values" in s.media]  # one image, two images, a spectrogram
    batch = Collator(get_family("llava_onevision"), processor.tokenizer.pad_token_id)(samples)
    assert sorted(batch["batch_num_images"].tolist()) == [1, 1, 2]
    tokens = media_token_ids(model.config, "llava_onevision")
    shards = [shard_batch(dict(batch), rank=r, size=size, pad_token_id=0, media_tokens=tokens) for r in range(size)]

    def features(media: dict) -> torch.Tensor:
        with torch.no_grad():
            out = model.get_image_features(pixel_values=media["pixel_values"], image_sizes=media["image_sizes"],
                                           batch_num_images=media["batch_num_images"])
        return torch.cat(list(out.pooler_output))

    whole = features(batch)
    rows = [s[SHARD].feature_rows["image"] for s in shards]
    assert sorted(torch.cat(rows[0].encoded).tolist()) == list(range(len(whole)))
    for r, shard in enumerate(shards):
        if len(rows[r].encoded[r]):  # each rank's own images make exactly the rows it says, anyres kept
            torch.testing.assert_close(features(shard), whole[rows[r].encoded[r]])
        assert int(shard["batch_num_images"].sum()) == len(shard["image_sizes"]) == len(shard["pixel_values"])
