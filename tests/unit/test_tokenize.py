"""Proof that labels are exactly the assistant answers, for both families.

The check is independent of the encoder's own piece logic: it reads the label tensor,
finds every supervised run, decodes it with the tokenizer and compares it with the
assistant strings of the record.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpc_train.config import DataConfig
from hpc_train.data.dataset import MediaLoader, SampleDataset, Skipped
from hpc_train.data.decoding.media import VideoFrames
from hpc_train.data.encoding.tokenize import IGNORE_INDEX, ChatEncoder, SampleMedia
from hpc_train.data.sources.records import Record, Turn, read_records
from hpc_train.errors import DataError
from hpc_train.models.families import get_family
from tests.conftest import FAMILIES


def supervised_runs(labels: torch.Tensor) -> list[list[int]]:
    runs, current = [], []
    for value in labels.tolist():
        if value != IGNORE_INDEX:
            current.append(value)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def assert_labels_are_answers(encoder: ChatEncoder, record: Record, sample) -> None:
    tokenizer = encoder.tokenizer
    eot = encoder.family.end_of_turn
    answers = [t.text.strip() for t in record.turns if t.role == "assistant"]
    runs = supervised_runs(sample.labels)
    assert len(runs) == len(answers), (runs, answers)
    for run, answer in zip(runs, answers, strict=True):
        decoded = tokenizer.decode(run, skip_special_tokens=False)
        # A template's separator space may be folded into the answer's first token.
        assert decoded.lstrip(" ") == answer + eot
    supervised = sample.labels != IGNORE_INDEX
    assert torch.equal(sample.labels[supervised], sample.input_ids[supervised])
    media_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>")}
    for token_id in media_ids:
        assert not supervised[sample.input_ids == token_id].any()
    assert sample.num_supervised == sum(len(r) for r in runs)


def rgb(seed: int, h: int = 48, w: int = 80) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def video(frames: int = 4) -> VideoFrames:
    rng = np.random.default_rng(7)
    return VideoFrames(frames=rng.integers(0, 255, (frames, 64, 64, 3), dtype=np.uint8),
                       timestamps=np.arange(frames) / 4.0, native_fps=4.0, num_source_frames=16)


def record(*turns: tuple[str, str], images: int = 0, videos: int = 0, audios: int = 0) -> Record:
    return Record(id="r1", turns=tuple(Turn(role, text) for role, text in turns),
                  images=tuple(Path(f"i{k}.png") for k in range(images)),
                  videos=tuple(Path(f"v{k}.mp4") for k in range(videos)),
                  audios=tuple(Path(f"a{k}.wav") for k in range(audios)),
                  source=Path("hand.jsonl"), line=7)


def encoder_for(loaded_tiny, family: str, **kwargs) -> ChatEncoder:
    return ChatEncoder(loaded_tiny[family][1], get_family(family), **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_mixed_media_labels(loaded_tiny, family):
    encoder = encoder_for(loaded_tiny, family)
    rec = record(
        ("system", "You answer in one word."),
        ("user", "<image>\nWhat colour is the ball?"),
        ("assistant", "red"),
        ("user", "And here: <video> and <image>?"),
        ("assistant", "The ball is green, then blue."),
        ("user", "<speech>\nHow high is the tone?"),
        ("assistant", " high "),
        images=2, videos=1, audios=1,
    )
    media = SampleMedia(images=[rgb(1), rgb(2, 64, 64)], videos=[video()], audios=[rgb(3, 64, 64)])
    sample = encoder.encode(rec, media)
    assert_labels_are_answers(encoder, rec, sample)
    assert sample.num_media_tokens > 0
    assert sample.answers == ["red", "The ball is green, then blue.", "high"]
    # The system turn and every user turn are unsupervised: the first supervised token
    # comes after the first image's tokens.
    first_supervised = int((sample.labels != IGNORE_INDEX).nonzero()[0])
    image_id = encoder.tokenizer.convert_tokens_to_ids(get_family(family).image_token)
    assert int((sample.input_ids == image_id).nonzero()[0]) < first_supervised


@pytest.mark.parametrize("family", FAMILIES)
def test_every_synthetic_record_has_exact_labels(loaded_tiny, synthetic_data, family):
    encoder = encoder_for(loaded_tiny, family)
    records = read_records(synthetic_data / "train.jsonl")
    loader = MediaLoader(DataConfig(video={"num_frames": 4}))
    seen_multi_turn = 0
    for rec in records:
        sample = encoder.encode(rec, loader.load(rec))
        assert_labels_are_answers(encoder, rec, sample)
        seen_multi_turn += sum(t.role == "assistant" for t in rec.turns) > 1
    assert seen_multi_turn > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_system_prompt_added_unsupervised(loaded_tiny, family):
    encoder = encoder_for(loaded_tiny, family, system_prompt="Be brief.")
    rec = record(("user", "Which colour comes after red?"), ("assistant", "green"))
    sample = encoder.encode(rec, SampleMedia())
    text = encoder.tokenizer.decode(sample.input_ids)
    assert "Be brief." in text
    assert_labels_are_answers(encoder, rec, sample)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_for_generation_ends_with_generation_prompt(loaded_tiny, family):
    encoder = encoder_for(loaded_tiny, family)
    rec = record(("user", "<image>\nWhat colour is the ball?"), ("assistant", "red"), images=1)
    media = SampleMedia(images=[rgb(1)])
    prompt = encoder.encode_prompt(rec, media)
    full = encoder.encode(rec, media)
    assert prompt.num_supervised == 0 and prompt.answers == ["red"]
    # The prompt is a prefix of the training sample, up to where the answer starts.
    n = len(prompt)
    assert torch.equal(full.input_ids[:n], prompt.input_ids)
    assert full.labels[n] != IGNORE_INDEX and (full.labels[:n] == IGNORE_INDEX).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_template_that_does_not_close_answers_is_refused(loaded_tiny, family):
    processor = copy.deepcopy(loaded_tiny[family][1])
    eot = get_family(family).end_of_turn
    processor.chat_template = processor.chat_template.replace(eot, "<|endoftext|>")
    encoder = ChatEncoder(processor, get_family(family))
    rec = record(("user", "Hi?"), ("assistant", "red"))
    with pytest.raises(DataError, match=rf"hand.jsonl:7 \[id r1\].*does not close assistant turn 1 with {eot}"):
        encoder.encode(rec, SampleMedia())


def test_template_that_rewrites_answers_is_refused(loaded_tiny):
    processor = copy.deepcopy(loaded_tiny["smolvlm"][1])
    processor.chat_template = processor.chat_template.replace("{{ item['text'] }}", "{{ item['text'] | upper }}")
    encoder = ChatEncoder(processor, get_family("smolvlm"))
    with pytest.raises(DataError, match="did not render assistant turn 1 verbatim"):
        encoder.encode(record(("user", "Hi?"), ("assistant", "red")), SampleMedia())


def test_more_placeholders_than_media_is_an_error(loaded_tiny):
    encoder = encoder_for(loaded_tiny, "smolvlm")
    rec = record(("user", "<image><image> two?"), ("assistant", "red"), images=2)
    with pytest.raises(DataError, match=r"hand.jsonl:7 \[id r1\]: more <image> placeholders"):
        encoder.encode(rec, SampleMedia(images=[rgb(1)]))


def dataset_for(loaded_tiny, synthetic_data, **data) -> SampleDataset:
    cfg = DataConfig(**data)
    records = read_records(synthetic_data / "train.jsonl", media_root=cfg.media_root,
                           check_media_exists=False)
    return SampleDataset(records, encoder_for(loaded_tiny, "smolvlm"), MediaLoader(cfg), cfg)


def first_with_image(ds: SampleDataset) -> int:
    return next(i for i in range(len(ds)) if ds.records[i].images)


def test_missing_media_skipped_or_fatal_by_config(loaded_tiny, synthetic_data, tmp_path):
    ds = dataset_for(loaded_tiny, synthetic_data, on_bad_sample="skip")
    i = first_with_image(ds)
    image = ds.records[i].images[0]
    backup = tmp_path / "moved.png"
    image.rename(backup)
    try:
        skipped = ds[i]
        assert isinstance(skipped, Skipped) and skipped.kind == "bad_record"
        assert str(image) in skipped.reason and "Fix:" in skipped.reason
        strict = dataset_for(loaded_tiny, synthetic_data, on_bad_sample="error")
        with pytest.raises(DataError, match=rf"train.jsonl:{ds.records[i].line} \[id "):
            strict[i]
    finally:
        backup.rename(image)


def test_over_long_sample_dropped_or_fatal_never_cut(loaded_tiny, synthetic_data):
    ds = dataset_for(loaded_tiny, synthetic_data, max_seq_len=16, truncation="drop")
    i = first_with_image(ds)
    dropped = ds[i]
    assert isinstance(dropped, Skipped) and dropped.kind == "too_long"
    assert "over data.max_seq_len=16" in dropped.reason
    strict = dataset_for(loaded_tiny, synthetic_data, max_seq_len=16, truncation="error")
    with pytest.raises(DataError, match="max_seq_len=16.*Fix: raise data.max_seq_len"):
        strict[i]
    roomy = dataset_for(loaded_tiny, synthetic_data, max_seq_len=4096)
    assert len(roomy[i]) > 16
