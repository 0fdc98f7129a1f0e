"""Videos decoded once (``data.prepared_media``, ``hpc-train prepare-media``): a prepared sample is
the decoded one (each family, whole and under a sequence-parallel frame share), stored frames are
smaller, a changed file or setting is a miss that is decoded and said, and a resize a processor
does not reproduce exactly is not used."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_train.config_file import load_config
from hpc_train.data.caches.prepared_media import PreparedMedia, resize_is_exact
from hpc_train.data.dataset import MediaLoader, SampleDataset
from hpc_train.data.pipeline import build_pipeline
from hpc_train.data.sources.mixture import read_split
from hpc_train.errors import ConfigError
from hpc_train.models.families import get_family
from hpc_train.prepare_media import prepare_media, run_videos, shard_of
from hpc_train.train.trainer import TrainLoop
from tests.conftest import TINY_RECIPES as RECIPES
from tests.unit.test_train_loop import batches, metrics

VIDEO_FAMILIES = ("smolvlm2", "llava_onevision", "llava_onevision_1_5")


def run_config(family: str, data: Path, store: Path, *overrides: str):
    return load_config(RECIPES[family], [f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'eval.jsonl'}",
                                         "data.video.num_frames=4", f"data.prepared_media={store}", *overrides])


def video_indices(dataset: SampleDataset) -> list[int]:
    return [i for i, record in enumerate(dataset.records) if record.videos]


def assert_same_samples(got, want) -> None:
    assert got.id == want.id
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
    assert got.media.keys() == want.media.keys()
    for key in want.media:
        assert torch.equal(got.media[key], want.media[key]), key


@pytest.mark.parametrize("family", ["smolvlm", *VIDEO_FAMILIES])
def test_a_prepared_video_gives_the_decoded_sample(loaded_tiny, synthetic_data, tmp_path, family):
    config = run_config(family, synthetic_data, tmp_path / "store")
    done = prepare_media(config, shard=(0, 1), workers=0, say=lambda _: None)
    assert done.stored == done.videos == len(run_videos(config)) > 0 and not done.failed
    processor = loaded_tiny[family][1]
    prepared = build_pipeline(config.data, processor, get_family(family))
    plain = build_pipeline(config.data.model_copy(update={"prepared_media": None}), processor, get_family(family))
    records = read_split(config, "train")
    for frame_share in (None, (1, 2)):  # whole, and the second rank of a sequence-parallel pair
        with_store = prepared.dataset(records, frame_share=frame_share)
        decoded = plain.dataset(records, frame_share=frame_share)
        picked = video_indices(decoded)[:3]
        for index in picked:
            assert_same_samples(with_store[index], decoded[index])
        assert with_store.media.decoded_unprepared == 0 and with_store.media.prepared.store.counts.hits >= len(picked)


def test_stored_frames_are_the_processor_s_first_resize_and_smaller(loaded_tiny, synthetic_data, tmp_path):
    config = run_config("llava_onevision", synthetic_data, tmp_path / "store")
    prepare_media(config, shard=(0, 1), workers=0, say=lambda _: None)
    store = PreparedMedia(tmp_path / "store", config.data, loaded_tiny["llava_onevision"][1],
                          get_family("llava_onevision"))
    path, clip = run_videos(config)[0]
    video = store.load(path, clip)
    assert video is not None and video.frames.shape[1:] == (32, 32, 3)  # its processor's 32 x 32, from 64 x 64
    assert video.frames.dtype == np.uint8 and len(video.timestamps) == len(video.frames) <= 4


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_each_family_s_resize_is_proven_exact_on_its_published_style_processor(loaded_tiny, family):
    processor = loaded_tiny[family][1]
    prepare = get_family(family).prepare_frames
    assert resize_is_exact(processor, lambda frames: prepare(processor, frames))


def test_a_resize_the_processor_does_not_reproduce_is_not_used(loaded_tiny, synthetic_data, tmp_path):
    family = dataclasses.replace(get_family("llava_onevision"),
                                 prepare_frames=lambda processor, frames: frames[:, ::2, ::2])  # not the processor's
    config = run_config("llava_onevision", synthetic_data, tmp_path / "store")
    store = PreparedMedia(tmp_path / "store", config.data, loaded_tiny["llava_onevision"][1], family)
    assert store.resize is None and "stored at their decoded size" in store.note


def test_a_changed_file_or_setting_is_a_miss_decoded_and_said(loaded_tiny, synthetic_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for item in synthetic_data.iterdir():
        (data / item.name).symlink_to(item)
    config = run_config("smolvlm2", data, tmp_path / "store")
    prepare_media(config, shard=(0, 1), workers=0, say=lambda _: None)
    processor = loaded_tiny["smolvlm2"][1]
    records = [r for r in read_split(config, "train") if r.videos]
    loader = MediaLoader(config.data, prepared=PreparedMedia(tmp_path / "store", config.data, processor,
                                                             get_family("smolvlm2")))
    assert loader.prepared.load(records[0].videos[0], records[0].video_clip) is not None
    more_frames = config.data.model_copy(update={"video": config.data.video.model_copy(update={"num_frames": 3})})
    assert PreparedMedia(tmp_path / "store", more_frames, processor,
                         get_family("smolvlm2")).load(records[0].videos[0], records[0].video_clip) is None
    target = records[0].videos[0].resolve()
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the file changed since
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            loader.load(records[0])
        assert loader.decoded_unprepared == 1
        assert any("is not in" in str(w.message) and "prepare-media" in str(w.message) for w in said)
    finally:
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_interrupted_preparation_continues_where_it_stopped(synthetic_data, tmp_path):
    config = run_config("smolvlm2", synthetic_data, tmp_path / "store")
    first = prepare_media(config, shard=(0, 2), workers=0, say=lambda _: None)
    whole = prepare_media(config, shard=(0, 1), workers=0, say=lambda _: None)
    assert first.stored > 0 and whole.already == first.stored and whole.stored == whole.videos - first.stored
    assert "already in" in whole.describe("store")


@pytest.mark.parametrize(("env", "asked", "shard"), [
    ({}, "2/8", (1, 8)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}, None, (4, 8)),
    ({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"}, None, (3, 4)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, None, (0, 1)),  # a batch or salloc shell: the whole
])
def test_each_process_takes_its_shard(env, asked, shard):
    assert shard_of(env, asked) == shard


@pytest.mark.parametrize("asked", ["0/4", "5/4", "two"])
def test_a_bad_shard_is_refused_with_the_form(asked):
    with pytest.raises(ConfigError, match="expected i/n"):
        shard_of({}, asked)


def test_prepare_media_needs_its_folder(synthetic_data):
    config = load_config(RECIPES["smolvlm2"], [f"data.train={synthetic_data / 'train.jsonl'}"])
    with pytest.raises(ConfigError, match="data.prepared_media is not set"):
        prepare_media(config, shard=(0, 1), workers=0)


def test_a_run_counts_the_videos_it_had_to_decode(build, tmp_path):
    """Half the videos prepared: each step's metrics row says how many of its samples' videos
    were decoded because the store lacked them."""

    parts = build(f"data.prepared_media={tmp_path / 'store'}", "train.max_steps=3")
    prepare_media(parts.config, shard=(0, 2), workers=0, say=lambda _: None)
    prepared = set(run_videos(parts.config)[0::2])
    fed = batches(parts, 3, size=4)
    records = parts.train.dataset.records
    expected = sum((Path(v), r.video_clip) not in prepared for r in (records[i] for i in range(12)) for v in r.videos)
    assert TrainLoop(parts).train(fed) == 0
    assert 0 < sum(row["videos_unprepared"] for row in metrics(parts)) == expected
    assert parts.timer.rank_report()["prepared_media"] == {"videos_unprepared": expected}  # the report's count


def test_a_video_that_cannot_be_decoded_is_listed_and_the_rest_prepared(synthetic_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "media").symlink_to(synthetic_data / "media")
    (data / "broken.mp4").write_bytes(b"not a video at all" * 100)
    lines = (synthetic_data / "train.jsonl").read_text().splitlines()
    videos = [line for line in lines if '"video"' in line][:2]
    broken = videos[1].replace(videos[1].split('"video": "')[1].split('"')[0], "broken.mp4")
    (data / "train.jsonl").write_text("\n".join([videos[0], broken]) + "\n")
    config = run_config("smolvlm2", data, tmp_path / "store", "data.eval=null")
    done = prepare_media(config, shard=(0, 1), workers=0, say=lambda _: None)
    assert done.videos == 2 and done.stored == 1 and len(done.failed) == 1 and "broken.mp4" in done.failed[0]
    assert "1 failed (the run tries them itself)" in done.describe("store")
