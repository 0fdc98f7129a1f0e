"""Videos decoded by the training process (``data.video.device``), proven on the CPU against the
workers' own decoding: the workers encode from stand-in frames, the training process decodes
with torchcodec on a device (here the CPU, the same code NVDEC runs through) and encodes again;
every batch, and the losses of a run, must be those of the plain path."""

from __future__ import annotations

import json

import pytest
import torch

from hpc_train.config import DataConfig
from hpc_train.config_file import load_config
from hpc_train.data.dataset import MediaLoader
from hpc_train.data.decoding.media import VideoSampling, load_video
from hpc_train.data.deferred_videos import DeviceVideos, videos_on_device
from hpc_train.data.pipeline import build_pipeline
from hpc_train.data.sources.records import read_records
from hpc_train.data.video_on_device import DeferredSample, decode_on_device
from hpc_train.errors import ConfigError, MediaError
from hpc_train.models.families import get_family
from hpc_train.train.trainer import TrainLoop

VIDEO_FAMILIES = ("smolvlm2", "llava_onevision", "llava_onevision_1_5")


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_a_batch_whose_videos_the_training_process_decodes_is_the_workers_batch(loaded_tiny, synthetic_data,
                                                                               family):
    data = DataConfig(video={"num_frames": 4, "backend": "torchcodec"})
    records = list(read_records(synthetic_data / "train.jsonl", media_root=data.media_root))[:12]
    pipeline = build_pipeline(data, loaded_tiny[family][1], get_family(family))
    plain, deferred = pipeline.dataset(records), pipeline.dataset(records, defer_videos=True)
    stage = DeviceVideos(deferred, "cpu")  # what a GPU run builds, on the CPU
    collate = pipeline.collator()
    handed = [deferred[i] for i in range(len(records))]
    stand_ins = [item for item in handed if isinstance(item, DeferredSample)]
    assert len(stand_ins) == sum(bool(r.videos) for r in records) > 0  # every video left to this process
    for first in range(0, len(records), 4):
        ours = collate(stage(handed[first:first + 4]))
        theirs = collate([plain[i] for i in range(first, first + 4)])
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(ours[key], value) if isinstance(value, torch.Tensor) else ours[key] == value, key
    real = stage([stand_ins[0]])[0].media
    assert any(not torch.equal(real[k], v) for k, v in stand_ins[0].sample.media.items())  # black frames replaced


def test_the_training_loop_trains_on_the_videos_the_training_process_decodes(build, tiny_model_dirs, tmp_path):
    def losses(defer: bool) -> list[float]:
        parts = build(f"model.path={tiny_model_dirs['smolvlm2']}", "model.family=smolvlm2", "train.mode=lora",
                      "train.max_steps=3", "train.log_every=1", "data.video.num_frames=4",
                      f"output_dir={tmp_path / ('deferred' if defer else 'plain')}")
        if defer:
            data = parts.train
            data.dataset = parts.pipeline.dataset(data.dataset.records, cached=True, defer_videos=True)
            data.finish = DeviceVideos(data.dataset, "cpu")
        assert TrainLoop(parts).train() == 0
        rows = (parts.output / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["loss"] for r in rows if "loss" in json.loads(r)]

    plain = losses(False)
    assert len(plain) == 3 and losses(True) == plain


def test_decoded_on_a_device_the_frames_are_the_workers_and_a_bad_file_says_what_to_do(synthetic_data, tmp_path):
    video = next(p for p in sorted((synthetic_data / "media" / "videos").glob("*.mp4")))
    sampling = VideoSampling(num_frames=4, backend="torchcodec")
    on_device = decode_on_device(video, sampling, None, "cpu")
    on_host = load_video(video, sampling)
    assert isinstance(on_device.frames, torch.Tensor) and on_device.frames.device.type == "cpu"
    assert torch.equal(on_device.frames, torch.from_numpy(on_host.frames))
    assert list(on_device.timestamps) == list(on_host.timestamps)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 64)
    with pytest.raises(MediaError, match="cannot open the video for decoding on cpu.*torchcodec's CUDA build"):
        decode_on_device(broken, sampling, None, "cpu")


def test_the_gpu_decoder_is_refused_where_it_cannot_run(loaded_tiny, synthetic_data):
    base = [f"data.train={synthetic_data / 'train.jsonl'}", "data.video.device=cuda"]
    config = load_config("tiny_smolvlm2", base)
    pipeline = build_pipeline(config.data, loaded_tiny["smolvlm2"][1], get_family("smolvlm2"))
    with pytest.raises(ConfigError, match="this run trains on cpu .* Fix: set data.video.device=cpu"):
        videos_on_device(config, get_family("smolvlm2"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="smolvlm takes a video as a run of images"):
        videos_on_device(config, get_family("smolvlm"), torch.device("cuda"))
    assert videos_on_device(config, get_family("smolvlm2"), torch.device("cuda")) is True
    # a training set that defers leaves the pipeline's own loader (evaluation's) decoding
    pipeline.dataset(list(read_records(synthetic_data / "train.jsonl", media_root=None))[:4], defer_videos=True)
    assert isinstance(pipeline.media, MediaLoader) and not pipeline.media.defer_videos
    plain = load_config("tiny_smolvlm2", [f"data.train={synthetic_data / 'train.jsonl'}"])
    assert videos_on_device(plain, get_family("smolvlm2"), torch.device("cuda")) is False
    for other in ("data.video.backend=decord", "train.sequence_parallel=2"):
        with pytest.raises(ConfigError, match="data.video.device=cuda decodes with torchcodec, whole videos"):
            load_config("tiny_smolvlm2", [*base, other])


def test_the_doctor_decodes_a_probe_on_the_device_before_the_run(synthetic_data, tmp_path):
    from hpc_train.data.video_on_device import device_decoder_problem
    from hpc_train.doctor import needs_of_config, run_checks

    assert device_decoder_problem("cpu") is None  # the probe itself decodes, where torchcodec can
    needs = needs_of_config("tiny_smolvlm2", [f"data.train={synthetic_data / 'train.jsonl'}",
                                              "data.video.device=cuda", f"output_dir={tmp_path}"], None)
    rows = {row.name: row for row in run_checks(needs)}
    row = rows["GPU video decoding"]
    if torch.cuda.is_available():
        assert row.status == "ok", row
    else:
        assert row.status == "fail" and "torch sees no CUDA GPU" in row.note and "data.video.device=cpu" in row.note
    plain = needs_of_config("tiny_smolvlm2", [f"data.train={synthetic_data / 'train.jsonl'}"], str(tmp_path))
    assert "GPU video decoding" not in {row.name for row in run_checks(plain)}
