"""Reading audio: a mono waveform at the run's rate, and the log-mel picture the vision tower
takes it as (the models we train have no audio encoder).

librosa is imported lazily: it pulls in scipy and numba (seconds of import time) that runs
without audio never need.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from hpc_train.data.decoding.media import FIX_AUDIO, FIX_SKIP, _check_file, _short
from hpc_train.errors import MediaError


def load_audio(path: str | Path, *, sample_rate: int = 16000,
               max_seconds: float | None = None) -> np.ndarray:
    """Load audio as mono float32 at ``sample_rate`` (first ``max_seconds`` only)."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    p = _check_file(path, FIX_AUDIO)
    import librosa
    import soundfile as sf

    try:
        # Hand librosa an open SoundFile: given a path it falls back to audioread on
        # undecodable bytes, which probes external decoders for seconds and then fails.
        with sf.SoundFile(os.fspath(p)) as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wave, _ = librosa.load(handle, sr=sample_rate, mono=True, duration=max_seconds)
    except Exception as exc:  # soundfile / librosa raise many unrelated types
        raise MediaError(f"cannot decode audio ({_short(exc)})", path=p,
                         fix=f"{FIX_AUDIO}, {FIX_SKIP}") from exc
    if wave.size == 0:
        raise MediaError("audio has no samples", path=p, fix=f"{FIX_AUDIO}, {FIX_SKIP}")
    return np.ascontiguousarray(wave, dtype=np.float32)


# Range of the log-mel image in dB below the clip's peak; quieter is black.
_TOP_DB = 80.0


def audio_to_image(wave: np.ndarray, sample_rate: int, *, size: int = 64) -> Image.Image:
    """Render audio as a ``size x size`` RGB log-mel spectrogram (low pitch at the bottom).

    The models we train have no audio encoder, so ``<speech>`` clips reach the vision
    tower as this picture.  Brightness is dB relative to the clip's peak over a fixed
    80 dB range (not min-max), so silence stays black; output is deterministic.
    """
    import librosa

    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    y = np.asarray(wave, dtype=np.float32).reshape(-1)
    if y.size == 0:
        raise ValueError("audio_to_image got an empty waveform")
    y = np.nan_to_num(y)
    # ~32 ms windows and 10 ms hops: enough frequency resolution to tell tones apart.
    n_fft = 1 << max(6, round(math.log2(0.032 * sample_rate)))
    if y.size < n_fft:
        y = np.pad(y, (0, n_fft - y.size))
    mel = librosa.feature.melspectrogram(
        y=y, sr=sample_rate, n_fft=n_fft, hop_length=max(1, sample_rate // 100),
        n_mels=64, fmax=sample_rate / 2, power=2.0)
    if not np.any(mel > 1e-10):
        grey = np.zeros((size, size), dtype=np.uint8)
    else:
        db = librosa.power_to_db(mel, ref=np.max, top_db=_TOP_DB)
        grey01 = np.clip((db + _TOP_DB) / _TOP_DB, 0.0, 1.0)
        # Mel bin 0 is the lowest frequency; flip so it is drawn at the bottom row.
        grey = np.flipud((grey01 * 255.0 + 0.5).astype(np.uint8))
        grey = np.asarray(Image.fromarray(np.ascontiguousarray(grey)).resize(
            (size, size), Image.Resampling.BILINEAR))
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
