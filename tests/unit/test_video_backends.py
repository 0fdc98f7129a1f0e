"""torchcodec beside decord: the same frames picked (and pixels within the stated tolerance), the
same lengths for packing, ``auto`` choosing torchcodec where it works and decord where it does not."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from hpc_train.config import DataConfig
from hpc_train.data.dataset import MediaLoader
from hpc_train.data.decoding.media import VideoSampling, load_video, video_settings
from hpc_train.data.decoding.video_backends import resolve_backend, torchcodec_problem
from hpc_train.data.encoding.lengths import sample_lengths
from hpc_train.data.encoding.tokenize import ChatEncoder
from hpc_train.data.sources.records import read_records
from hpc_train.doctor.runtime import video_backend_check
from hpc_train.errors import ConfigError
from hpc_train.models.families import get_family
from tests.conftest import FAMILIES

# The most two decoders built on different FFmpeg releases may differ by (colour conversion
# rounding); measured on these videos: 0.
MAX_GREY_LEVELS = 2


def _videos(synthetic_data) -> list:
    records = [json.loads(line) for line in (synthetic_data / "train.jsonl").read_text().splitlines()]
    return [synthetic_data / r["video"] for r in records if r.get("video")]


@pytest.mark.parametrize(("sampling", "clip"), [
    (VideoSampling(num_frames=8), None), (VideoSampling(num_frames=32, max_frames=32), None),
    (VideoSampling(mode="fps", fps=3.0), None), (VideoSampling(num_frames=4), (0.5, 1.5)),
])
def test_torchcodec_picks_decords_frames(synthetic_data, sampling, clip):
    videos = _videos(synthetic_data)
    assert len(videos) >= 5
    for path in videos[:8]:
        ours = load_video(path, sampling, clip=clip)
        theirs = load_video(path, VideoSampling(**{**sampling.__dict__, "backend": "torchcodec"}), clip=clip)
        assert ours.frames.shape == theirs.frames.shape
        assert (ours.num_source_frames, ours.native_fps) == (theirs.num_source_frames, pytest.approx(theirs.native_fps))
        np.testing.assert_allclose(ours.timestamps, theirs.timestamps, atol=1e-6)
        gap = np.abs(ours.frames.astype(np.int16) - theirs.frames.astype(np.int16)).max()
        assert gap <= MAX_GREY_LEVELS, (path, gap)


@pytest.mark.parametrize("family", FAMILIES)
def test_packing_lengths_are_exact_with_torchcodec(loaded_tiny, synthetic_data, family, tmp_path):
    data = DataConfig(video={"num_frames": 4, "backend": "torchcodec"})
    records = read_records(synthetic_data / "train.jsonl", media_root=data.media_root)
    encoder = ChatEncoder(loaded_tiny[family][1], get_family(family))
    estimated = sample_lengths(records, encoder, data, cache_dir=tmp_path, source=synthetic_data / "train.jsonl")
    assert estimated == [len(encoder.encode(r, MediaLoader(data).load(r))) for r in records]


def test_auto_is_torchcodec_where_it_works_and_keys_name_the_decoder():
    assert torchcodec_problem() is None
    assert resolve_backend("auto") == "torchcodec" and resolve_backend("decord") == "decord"
    auto, decord = (video_settings(DataConfig(video={"backend": b}).video) for b in ("auto", "decord"))
    assert auto["backend"] == "torchcodec" and auto != decord


def test_the_doctor_names_the_backend_auto_picks_and_the_ffmpeg_it_decodes_with():
    row = video_backend_check("auto")
    assert row.status == "ok" and row.found == "auto uses torchcodec"
    assert re.fullmatch(r"torchcodec \S+, FFmpeg \S+ \(.+\)", row.note), row.note


def test_without_ffmpeg_auto_falls_back_to_decord_and_torchcodec_is_refused():
    # torchcodec imported before hpc-train could load PyAV's FFmpeg: it found none and stays so.
    script = (
        "import torchcodec\n"
        "from hpc_train.data.decoding.video_backends import resolve_backend\n"
        "from hpc_train.doctor.runtime import video_backend_check\n"
        "from hpc_train.errors import ConfigError\n"
        "print([(r.status, r.found) for r in map(video_backend_check, ('auto', 'torchcodec'))])\n"
        "print(resolve_backend('auto'))\n"
        "try:\n    resolve_backend('torchcodec')\nexcept ConfigError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    doctor, auto, refusal = done.stdout.strip().splitlines()[-3:]
    assert doctor == str([("warn", "auto uses decord"), ("fail", "torchcodec does not decode here")])
    assert auto == "decord"
    assert refusal.startswith("data.video.backend=torchcodec: torchcodec finds no FFmpeg it can use, and it was "
                              "imported before hpc-train loaded PyAV's FFmpeg")
    assert "Fix: set data.video.backend: decord" in refusal


def test_an_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="data.video.backend=vlc: not one of auto, decord, torchcodec"):
        resolve_backend("vlc")


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_max_side_scales_frames_in_the_decoder_to_the_size_the_lengths_assume(synthetic_data, backend):
    from PIL import Image

    from hpc_train.data.decoding.media import black_video, video_size

    for path in _videos(synthetic_data)[:3]:
        width, height = video_size(path)
        side = max(width, height) // 2
        full = load_video(path, VideoSampling(num_frames=4, backend=backend))
        small = load_video(path, VideoSampling(num_frames=4, backend=backend, max_side=side))
        assert max(small.frames.shape[1:3]) == side and small.frames.shape[0] == full.frames.shape[0]
        assert abs(small.frames.shape[2] / small.frames.shape[1] - width / height) < 0.1  # aspect kept
        assert black_video(path, VideoSampling(num_frames=4, max_side=side)).frames.shape == small.frames.shape
        # FFmpeg's filter, not PIL's: close to PIL's bicubic resize of the full frames, not equal
        resized = np.stack([np.asarray(Image.fromarray(f).resize(small.frames.shape[2:0:-1], Image.BICUBIC))
                            for f in full.frames])
        assert np.abs(resized.astype(np.int16) - small.frames.astype(np.int16)).mean() < 4
        untouched = load_video(path, VideoSampling(num_frames=4, backend=backend, max_side=max(width, height)))
        assert np.array_equal(untouched.frames, full.frames)
        threaded = load_video(path, VideoSampling(num_frames=4, backend=backend, threads=2))
        assert np.array_equal(threaded.frames, full.frames)


def test_packing_lengths_are_exact_with_frames_scaled_in_the_decoder(loaded_tiny, tmp_path):
    """LLaVA-OneVision-1.5 gives a frame tokens by its size: the lengths packing plans with must
    be those of the scaled frames, fewer than the full frames'."""
    import cv2

    family = "llava_onevision_1_5"
    writer = cv2.VideoWriter(str(tmp_path / "wide.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (256, 144))
    for level in range(0, 240, 15):
        writer.write(np.full((144, 256, 3), level, dtype=np.uint8))
    writer.release()
    source = tmp_path / "train.jsonl"
    source.write_text(json.dumps({"id": "wide", "video": str(tmp_path / "wide.mp4"), "conversations": [
        {"from": "human", "value": "<video>\nWhat changes?"}, {"from": "gpt", "value": "It brightens."}]}) + "\n")
    encoder = ChatEncoder(loaded_tiny[family][1], get_family(family))
    lengths = {}
    for side in (64, None):
        data = DataConfig(video={"num_frames": 4, "max_side": side})
        records = read_records(source, media_root=data.media_root)
        lengths[side] = sample_lengths(records, encoder, data, cache_dir=tmp_path / str(side), source=source)
        assert lengths[side] == [len(encoder.encode(r, MediaLoader(data).load(r))) for r in records]
    assert lengths[64][0] < lengths[None][0]


def test_cache_keys_change_with_max_side_and_not_with_decoder_threads():
    plain = video_settings(DataConfig().video)
    assert "max_side" not in plain  # stores made before the setting existed keep their keys
    assert video_settings(DataConfig(video={"decoder_threads": 4}).video) == plain
    assert video_settings(DataConfig(video={"max_side": 512}).video) == {**plain, "max_side": 512}
