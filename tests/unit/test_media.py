"""Tests for hpc_train.data.decoding.media: frame sampling, decoding, errors, images and audio."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from hpc_train.data.decoding import media
from hpc_train.data.decoding.audio import audio_to_image, load_audio
from hpc_train.data.decoding.media import (
    VideoFrames,
    VideoSampling,
    load_image,
    load_video,
    probe_video,
    resize_to_4to1,
    sample_frame_indices,
)
from hpc_train.data.sources.synthetic import COLOURS, SyntheticSpec, make_dataset
from hpc_train.errors import DataError, MediaError

# ---------------------------------------------------------------- sample_frame_indices


def _check_indices(idx: np.ndarray, n: int) -> None:
    assert idx.dtype == np.int64
    assert idx.ndim == 1 and len(idx) >= 1
    assert np.all(np.diff(idx) > 0), f"not strictly increasing: {idx}"
    assert idx[0] >= 0 and idx[-1] < n


def test_uniform_count_endpoints_and_order():
    idx = sample_frame_indices(100, 25.0, VideoSampling(num_frames=8))
    _check_indices(idx, 100)
    assert len(idx) == 8
    assert idx[0] == 0 and idx[-1] == 99
    # Evenly spread: gaps differ by at most one frame.
    gaps = np.diff(idx)
    assert gaps.max() - gaps.min() <= 1


def test_uniform_many_sizes_are_unique_and_bounded():
    for n in range(1, 60):
        for k in (1, 2, 3, 7, 8, 16, 59):
            idx = sample_frame_indices(n, 30.0, VideoSampling(num_frames=k, max_frames=64))
            _check_indices(idx, n)
            assert len(idx) == min(n, k)


def test_uniform_single_frame_is_the_middle():
    assert sample_frame_indices(101, 25.0, VideoSampling(num_frames=1)).tolist() == [50]


def test_uniform_respects_max_frames():
    idx = sample_frame_indices(100, 25.0, VideoSampling(num_frames=16, max_frames=4))
    assert len(idx) == 4 and idx[0] == 0 and idx[-1] == 99


def test_short_video_gives_each_frame_once():
    idx = sample_frame_indices(5, 25.0, VideoSampling(num_frames=8))
    assert idx.tolist() == [0, 1, 2, 3, 4]


def test_fps_mode_spacing():
    idx = sample_frame_indices(100, 25.0, VideoSampling(mode="fps", fps=5.0))
    _check_indices(idx, 100)
    assert len(idx) == 20
    assert set(np.diff(idx).tolist()) == {5}


def test_fps_mode_fractional_step():
    # 25 fps sampled at 2 fps: one frame every 12.5 source frames.
    idx = sample_frame_indices(100, 25.0, VideoSampling(mode="fps", fps=2.0))
    assert idx.tolist() == [0, 12, 25, 37, 50, 62, 75, 87]


def test_fps_mode_max_frames_cap():
    idx = sample_frame_indices(1000, 25.0, VideoSampling(mode="fps", fps=5.0, max_frames=10))
    _check_indices(idx, 1000)
    assert len(idx) == 10
    assert idx[0] == 0 and idx[-1] >= 990  # still spans the whole video


def test_fps_above_native_gives_unique_frames():
    idx = sample_frame_indices(10, 5.0, VideoSampling(mode="fps", fps=30.0))
    assert idx.tolist() == list(range(10))


def test_clip_restricts_frames():
    idx = sample_frame_indices(100, 25.0, VideoSampling(num_frames=8), clip=(1.0, 2.0))
    _check_indices(idx, 100)
    assert idx[0] == 25 and idx[-1] == 49  # frames shown during [1 s, 2 s)
    fps_idx = sample_frame_indices(100, 25.0, VideoSampling(mode="fps", fps=4.0), clip=(1.0, 2.0))
    assert np.all((fps_idx >= 25) & (fps_idx < 50)) and len(fps_idx) == 4


def test_clip_end_past_video_is_clamped():
    idx = sample_frame_indices(100, 25.0, VideoSampling(num_frames=4), clip=(3.0, 60.0))
    assert idx[0] == 75 and idx[-1] == 99


def test_tiny_clip_gives_one_frame():
    idx = sample_frame_indices(100, 25.0, VideoSampling(num_frames=8), clip=(1.01, 1.02))
    assert idx.tolist() == [25]


@pytest.mark.parametrize("clip", [(4.0, 10.0), (50.0, 60.0), (2.0, 1.0), (-1.0, 2.0), (1.0, 1.0),
                                  (float("nan"), 1.0)])
def test_bad_clip_raises_media_error(clip):
    with pytest.raises(MediaError, match="clip") as info:
        sample_frame_indices(100, 25.0, VideoSampling(), clip=clip)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"num_frames": 0}, "num_frames"), ({"num_frames": -3}, "num_frames"),
     ({"fps": 0.0}, "fps"), ({"fps": -1.0}, "fps"), ({"fps": float("nan")}, "fps"),
     ({"max_frames": 0}, "max_frames"), ({"mode": "random"}, "mode")],
)
def test_invalid_sampling_raises(kwargs, word):
    with pytest.raises(ValueError, match=word):
        VideoSampling(**kwargs)


@pytest.mark.parametrize(("n", "fps"), [(0, 25.0), (-1, 25.0), (10, 0.0), (10, float("inf"))])
def test_invalid_video_shape_raises(n, fps):
    with pytest.raises(ValueError, match="must be"):
        sample_frame_indices(n, fps, VideoSampling())


# ---------------------------------------------------------------- videos


@pytest.fixture(scope="module")
def video_set(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("videos")
    make_dataset(out, SyntheticSpec(n_train=3, n_eval=0, kinds=("video",), seed=7))
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    return out, records


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """40 frames at 10 fps; frame t has grey level 5*t so frames can be identified."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (32, 32))
    for t in range(40):
        writer.write(np.full((32, 32, 3), 5 * t + 20, dtype=np.uint8))
    writer.release()
    return path


def _ball_colour_estimate(frame: np.ndarray) -> np.ndarray:
    """Mean colour of the most saturated pixels (the ball should be the most saturated)."""
    px = frame.reshape(-1, 3).astype(np.float64)
    background = np.median(px, axis=0)
    chroma = px.max(axis=1) - px.min(axis=1)
    # Background pixels that happen to be saturated are pushed down the ranking.
    score = chroma + 0.5 * np.linalg.norm(px - background, axis=1)
    return px[np.argsort(score)[-60:]].mean(axis=0)


BACKENDS = pytest.mark.parametrize("backend", ["decord", "torchcodec"])


@BACKENDS
def test_probe_video(video_set, backend):
    root, records = video_set
    assert probe_video(root / records[0]["video"], backend) == (8, pytest.approx(4.0))


@BACKENDS
def test_load_video_shape_timestamps_and_colour(video_set, backend):
    root, records = video_set
    for rec in records:
        clip = load_video(root / rec["video"], VideoSampling(num_frames=8, backend=backend))
        assert isinstance(clip, VideoFrames)
        assert clip.frames.shape == (8, 64, 64, 3) and clip.frames.dtype == np.uint8
        assert clip.num_source_frames == 8 and clip.native_fps == pytest.approx(4.0)
        assert np.all(np.diff(clip.timestamps) > 0)
        np.testing.assert_allclose(clip.timestamps, np.arange(8) / 4.0, atol=0.02)
        palette = np.array(list(COLOURS.values()), dtype=np.float64)
        for frame in clip.frames:
            mean = _ball_colour_estimate(frame)
            dist = np.linalg.norm(palette - mean, axis=1)
            assert list(COLOURS)[int(dist.argmin())] == rec["answer"], (rec["id"], mean)
            assert dist.min() < 50


@BACKENDS
def test_load_video_fps_mode_and_clip(long_video, backend):
    clip = load_video(long_video, VideoSampling(mode="fps", fps=2.0, backend=backend), clip=(1.0, 3.0))
    np.testing.assert_allclose(clip.timestamps, [1.0, 1.5, 2.0, 2.5], atol=0.01)
    # Frames really are the ones asked for: grey level 5*t + 20 for t = 10, 15, 20, 25.
    levels = clip.frames.reshape(len(clip.frames), -1).mean(axis=1)
    np.testing.assert_allclose(levels, [70, 95, 120, 145], atol=6)
    assert clip.num_source_frames == 40 and clip.native_fps == pytest.approx(10.0)


@BACKENDS
def test_load_video_clip_outside_names_path(long_video, backend):
    with pytest.raises(MediaError) as info:
        load_video(long_video, VideoSampling(backend=backend), clip=(10.0, 12.0))
    assert str(long_video) in str(info.value) and "Fix:" in str(info.value)


class _FakeReader:
    """Stands in for decord.VideoReader to reach states real files rarely produce."""

    def __init__(self, n: int, fail_batch: bool = False) -> None:
        self.n, self.fail_batch = n, fail_batch

    def __len__(self) -> int:
        return self.n

    def get_avg_fps(self) -> float:
        return 25.0

    def get_batch(self, idx: list[int]) -> None:
        raise RuntimeError("corrupt packet")

    def get_frame_timestamp(self, idx: list[int]) -> np.ndarray:
        return np.zeros((len(idx), 2))


@pytest.mark.parametrize(("n", "match"), [(0, "0 frames"), (10, "cannot decode frames")])
def test_load_video_decoder_states_become_media_errors(tmp_path, monkeypatch, n, match):
    import decord

    monkeypatch.setattr(decord, "VideoReader", lambda *a, **k: _FakeReader(n))
    path = tmp_path / "v.mp4"
    path.write_bytes(b"x" * 10)
    with pytest.raises(MediaError, match=match) as info:
        load_video(path, VideoSampling())
    assert str(path) in str(info.value) and "Fix:" in str(info.value)


# ---------------------------------------------------------------- error handling


def _loader(suffix: str):
    return {
        ".mp4": lambda p: load_video(p, VideoSampling()),
        ".mp4-torchcodec": lambda p: load_video(p, VideoSampling(backend="torchcodec")),
        ".png": load_image,
        ".wav": load_audio,
    }[suffix]


@pytest.mark.parametrize("suffix", [".mp4", ".mp4-torchcodec", ".png", ".wav"])
@pytest.mark.parametrize("state", ["missing", "empty", "garbage", "directory"])
def test_unreadable_media_raise_media_error(tmp_path, suffix, state):
    path = tmp_path / f"bad{suffix.split('-')[0]}"
    if state == "empty":
        path.write_bytes(b"")
    elif state == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif state == "directory":
        path.mkdir()
    with pytest.raises(MediaError) as info:
        _loader(suffix)(path)
    message = str(info.value)
    assert str(path) in message and "Fix:" in message
    assert isinstance(info.value, DataError) and info.value.path == str(path)


@BACKENDS
def test_probe_video_garbage(tmp_path, backend):
    path = tmp_path / "x.mp4"
    path.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(MediaError, match="cannot decode video") as info:
        probe_video(path, backend)
    assert str(path) in str(info.value) and "Fix: re-encode it with `ffmpeg" in str(info.value)


def test_truncated_png_is_media_error(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[:60])
    with pytest.raises(MediaError, match="cannot decode image"):
        load_image(path)


# ---------------------------------------------------------------- images


def test_load_image_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 150 and top[0] < 100  # the left strip is now at the top


def test_load_image_flattens_alpha_onto_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    path = tmp_path / "alpha.png"
    rgba.save(path)
    assert np.asarray(load_image(path)).min() == 255


def test_load_image_max_side_downscales_only(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100), (1, 2, 3)).save(path)
    assert load_image(path, max_side=50).size == (50, 25)
    assert load_image(path, max_side=1000).size == (200, 100)


def test_load_image_4to1_with_max_side(tmp_path):
    path = tmp_path / "sq.png"
    Image.new("RGB", (100, 100), (9, 9, 9)).save(path)
    img = load_image(path, aspect_4to1=True)
    assert img.size == (400, 100)
    small = load_image(path, aspect_4to1=True, max_side=128)
    assert small.width == 4 * small.height and small.width <= 128


@pytest.mark.parametrize("size", [(64, 64), (400, 50), (30, 90), (401, 7), (1, 1), (10, 3)])
def test_resize_to_4to1_shape_and_content(size):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = resize_to_4to1(Image.fromarray(arr))
    assert out.mode == "RGB" and out.width == 4 * out.height
    # Unscaled content is pasted intact, centred.
    w, h = size
    x0, y0 = (out.width - w) // 2, (out.height - h) // 2
    np.testing.assert_array_equal(np.asarray(out)[y0:y0 + h, x0:x0 + w], arr)


def test_resize_to_4to1_pads_with_mean_colour_and_scales_to_height():
    img = Image.new("RGB", (10, 10), (200, 100, 50))
    img.paste((0, 0, 0), (0, 0, 5, 10))
    out = resize_to_4to1(img)
    assert out.getpixel((0, 0)) == (100, 50, 25)
    sized = resize_to_4to1(img, height=32)
    assert sized.size == (128, 32)


# ---------------------------------------------------------------- audio


def _tone(freq: float, sr: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[spec.argmax()])


def test_load_audio_resamples_and_keeps_pitch(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, _tone(440.0, 22050), 22050)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == 16000
    assert abs(_peak_hz(wave, 16000) - 440.0) < 3


def test_load_audio_mono_and_max_seconds(tmp_path):
    path = tmp_path / "st.wav"
    stereo = np.stack([_tone(300.0, 8000), _tone(300.0, 8000)], axis=1)
    sf.write(path, stereo, 8000)
    wave = load_audio(path, sample_rate=16000, max_seconds=0.25)
    assert wave.shape == (4000,)


def test_audio_to_image_pitch_rows_differ():
    sr = 16000
    low = np.asarray(audio_to_image(_tone(300.0, sr), sr))
    high = np.asarray(audio_to_image(_tone(1200.0, sr), sr))
    assert low.shape == high.shape == (64, 64, 3)
    assert np.array_equal(low[..., 0], low[..., 2])  # greyscale replicated
    low_row = int(low[..., 0].mean(axis=1).argmax())
    high_row = int(high[..., 0].mean(axis=1).argmax())
    # Low frequencies are drawn at the bottom (larger row index).
    assert low_row > high_row + 5
    assert np.abs(low.astype(int) - high.astype(int)).mean() > 10


def test_audio_to_image_deterministic_size_and_silence():
    sr = 16000
    wave = _tone(500.0, sr, 0.5)
    a = audio_to_image(wave, sr, size=32)
    b = audio_to_image(wave.copy(), sr, size=32)
    assert a.size == (32, 32) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert np.asarray(audio_to_image(np.zeros(sr), sr)).max() == 0
    assert audio_to_image(np.ones(10, dtype=np.float32), sr).size == (64, 64)  # shorter than a window
    with pytest.raises(ValueError):
        audio_to_image(np.zeros(0), sr)


def test_no_decoder_at_import():
    # Decoders must only be opened inside calls: DataLoader workers fork/pickle.
    from hpc_train.data.decoding import video_backends

    for module in (media, video_backends):
        src = Path(module.__file__).read_text()
        top_level = [line for line in src.splitlines() if line.startswith(("import ", "from "))]
        assert not any("decord" in line or "torchcodec" in line for line in top_level)


@BACKENDS
@pytest.mark.parametrize("size", [2, 3, 16])
def test_a_group_decodes_each_sampled_frame_once_each_rank_its_share(long_video, size, backend):
    from hpc_train.data.decoding.media_share import share_bounds

    sampling = VideoSampling(num_frames=10, backend=backend)
    whole = load_video(long_video, sampling)
    shares = [load_video(long_video, sampling, share=lambda n, r=r: share_bounds(n, r, size)) for r in range(size)]
    assert [i for s in shares for i in range(*s.decoded)] == list(range(10))
    for part in shares:
        start, end = part.decoded
        assert part.frames.shape == whole.frames.shape  # the processor still sees every frame's size
        np.testing.assert_array_equal(part.frames[start:end], whole.frames[start:end])
        assert not part.frames[:start].any() and not part.frames[end:].any()  # the rest: black stand-ins
        np.testing.assert_array_equal(part.timestamps, whole.timestamps)


def test_black_video_has_the_sampled_frames_sizes_and_times(long_video):
    from hpc_train.data.decoding.media import black_video

    sampling = VideoSampling(mode="fps", fps=2.0)
    black, real = black_video(long_video, sampling, clip=(1.0, 3.0)), load_video(long_video, sampling, clip=(1.0, 3.0))
    assert black.frames.shape == real.frames.shape and not black.frames.any() and black.decoded == (0, 0)
    np.testing.assert_array_equal(black.timestamps, real.timestamps)


@pytest.fixture(scope="module")
def undecodable_video(tmp_path_factory) -> Path:
    """40 frames whose second half's coded bytes are overwritten: the container opens and
    describes itself (frame count, rate, size), the later frames do not decode."""
    path = tmp_path_factory.mktemp("broken") / "frames.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (32, 32))
    noise = np.random.default_rng(0)
    for _ in range(40):
        writer.write(noise.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    writer.release()
    data = bytearray(path.read_bytes())
    start, end = (data.find(b"mdat") + data.find(b"moov")) // 2, data.find(b"moov") - 4
    data[start:end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))
    return path


def test_frames_a_rank_cannot_decode_are_black_under_skip_and_an_error_otherwise(undecodable_video):
    from hpc_train.config import DataConfig
    from hpc_train.data.dataset import MediaLoader
    from hpc_train.data.sources.records import Record, Turn

    record = Record(id="r", turns=(Turn("user", "<video>"), Turn("assistant", "a")), images=(),
                    videos=(undecodable_video,), audios=(), source=Path("train.jsonl"), line=3)
    skip = DataConfig(video={"num_frames": 8}, on_bad_sample="skip")
    # the group cannot tell that one rank's frames failed: the sample stays, as black frames
    with pytest.warns(UserWarning, match=r"frames\.mp4.*cannot decode frames.*black frames instead"):
        frames = MediaLoader(skip, frame_share=(1, 2)).load(record).videos[0]
    assert frames.decoded == (0, 0) and frames.frames.shape == (8, 32, 32, 3) and not frames.frames.any()
    with pytest.raises(MediaError, match="cannot decode frames"):
        MediaLoader(DataConfig(video={"num_frames": 8}), frame_share=(1, 2)).load(record)
    with pytest.raises(MediaError, match="cannot decode frames"):  # without a group: skipped as before
        MediaLoader(skip).load(record)
