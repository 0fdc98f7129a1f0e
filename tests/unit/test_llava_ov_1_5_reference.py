"""LLaVA-OneVision-1.5 exactness against its reference implementation.

The reference is the checkpoint's own modeling code (EvolvingLMMs-Lab/LLaVA-OneVision-1.5,
``ds/llavaonevision1_5/``, at the commit named in the data file), run once outside the project
on the tiny checkpoint :func:`checkpoint` makes (seeded: the same weights on every machine), in
the hub's layout, on the records below. Its losses and logits are the data file; this test runs
our model on the same records, fed through our own encoder (the family's chat template and
processor), and must give them (fp32, within 1e-4 relative).

Where a call holds more than one image or video frame, the reference as published keeps the
wrong rows when it drops the class tokens (segment i's rows are read i - 1 places early: its
class token and a neighbour's patch in, its last patch out). Ours drops each segment's own class
token; the data file also holds the reference with that one line corrected
(``reference_fixed``), which ours must equal, and the published reference's numbers, which ours
must then differ from. With one image (or none) the two agree and ours equals both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_train.data.decoding.media import VideoFrames
from hpc_train.data.encoding.tokenize import ChatEncoder, EncodedSample, SampleMedia
from hpc_train.models.families import get_family
from hpc_train.models.tiny import build_tiny

from .test_tokenize import record, rgb

REFERENCE = Path(__file__).parents[1] / "data" / "llava_ov_1_5_reference.json"
KEPT = 96
"""Logits kept per row (its first ``KEPT`` entries, and the whole row's logsumexp): the rows of
the first and last supervised positions' predictions, the last media position and the last one."""


def checkpoint() -> tuple[torch.nn.Module, object]:
    """The tiny random checkpoint both implementations ran (the family's tiny model, seed 0)."""
    model, processor = build_tiny("llava_onevision_1_5")
    return model.float().eval(), processor


def frames(count: int, height: int, width: int, seed: int) -> VideoFrames:
    rng = np.random.default_rng(seed)
    return VideoFrames(frames=rng.integers(0, 255, (count, height, width, 3), dtype=np.uint8),
                       timestamps=np.arange(count, dtype=np.float64), native_fps=1.0, num_source_frames=count)


def records() -> dict[str, tuple[object, SampleMedia]]:
    """One image; images of several sizes (a square, a tall one past the pixel budget, a wide
    strip); an 8-frame video; a text-only exchange."""
    return {
        "image": (record(("user", "<image>\nWhat colour is the ball?"), ("assistant", "red"), images=1),
                  SampleMedia(images=[rgb(4, 100, 70)])),
        "images": (record(("user", "<image> <image> and <image>: which ball is largest?"), ("assistant", "the red one"),
                          images=3), SampleMedia(images=[rgb(1, 64, 64), rgb(2, 150, 90), rgb(3, 30, 120)])),
        "video": (record(("user", "<video>\nWhat colour is the ball?"), ("assistant", "yellow"), videos=1),
                  SampleMedia(videos=[frames(8, 48, 80, seed=5)])),
        "text": (record(("system", "Answer in one word."), ("user", "Which colour comes after red?"),
                        ("assistant", "green")), SampleMedia()),
    }


def encoded(processor: object) -> dict[str, EncodedSample]:
    encoder = ChatEncoder(processor, get_family("llava_onevision_1_5"))
    return {name: encoder.encode(rec, media) for name, (rec, media) in records().items()}


def kept_positions(sample: EncodedSample, media_ids: list[int]) -> list[int]:
    """The rows of logits the data file keeps for ``sample`` (see :data:`POSITIONS`)."""
    supervised = (sample.labels[1:] != -100).nonzero().flatten()  # position t predicts label t + 1
    media = torch.isin(sample.input_ids, torch.tensor(media_ids)).nonzero().flatten()
    return [int(supervised[0]), int(supervised[-1]), int(media[-1]) if len(media) else 0, len(sample.input_ids) - 1]


def forward(model: torch.nn.Module, sample: EncodedSample) -> tuple[float, torch.Tensor]:
    """Our model's loss and logits on one sample, as a batch of one."""
    with torch.no_grad():
        out = model(input_ids=sample.input_ids[None], labels=sample.labels[None], use_cache=False,
                    **{k: v for k, v in sample.media.items() if not k.endswith("_rows")})
    return float(out.loss), out.logits[0]


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def test_our_model_gives_the_reference_implementations_losses_and_logits(reference):
    model, processor = checkpoint()
    samples = encoded(processor)
    assert set(samples) == set(reference["records"])
    for name, sample in samples.items():
        expected = reference["records"][name]
        assert sample.input_ids.tolist() == expected["input_ids"], name  # the same tokens went in
        assert expected["positions"] == kept_positions(sample, [model.config.image_token_id,
                                                                model.config.video_token_id])
        loss, logits = forward(model, sample)
        assert matches(loss, logits, expected["positions"], expected["reference_fixed"]), name
        segments = sum(int(grid[:, 0].sum()) for key, grid in sample.media.items() if key.endswith("grid_thw"))
        assert matches(loss, logits, expected["positions"], expected["reference"]) == (segments <= 1), name


def matches(loss: float, logits: torch.Tensor, positions: list[int], numbers: dict) -> bool:
    """Whether ``loss`` and the kept rows of ``logits`` are ``numbers``' within 1e-4 relative."""
    if loss != pytest.approx(numbers["loss"], rel=1e-4):
        return False
    ours, rows = logits[positions], torch.tensor(numbers["logits"])
    close = (ours[:, :KEPT] - rows).abs().amax(dim=1) <= 1e-4 * rows.abs().amax(dim=1)
    return bool(close.all()) and ours.logsumexp(-1).tolist() == pytest.approx(numbers["logsumexp"], rel=1e-4)
