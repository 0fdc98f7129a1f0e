"""Tests for hpc_train.data.sources.synthetic: layout, determinism and that labels match content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hpc_train.data.decoding.audio import load_audio
from hpc_train.data.decoding.media import VideoSampling, load_image, load_video
from hpc_train.data.sources.records import read_records
from hpc_train.data.sources.synthetic import (
    COLOURS,
    KINDS,
    PITCHES,
    QUESTION_COLOUR,
    QUESTION_PITCH,
    SyntheticSpec,
    dominant_palette_colour,
    make_dataset,
    render_image,
)
from hpc_train.synthetic_words import (
    CAPTIONS,
    QUESTION_DESCRIBE_IMAGE,
    QUESTION_DESCRIBE_VIDEO,
    vocabulary_text,
)

SPEC = SyntheticSpec(n_train=12, n_eval=6, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn")
    return out, make_dataset(out, SPEC)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _media_paths(rec: dict) -> list[str]:
    out = []
    for key in ("image", "video", "audio"):
        value = rec.get(key)
        if value is not None:
            out += value if isinstance(value, list) else [value]
    return out


def test_counts_per_split_and_kind(dataset):
    out, summary = dataset
    for split, n in (("train", SPEC.n_train), ("eval", SPEC.n_eval)):
        recs = _records(out / f"{split}.jsonl")
        assert len(recs) == n
        counted = {k: sum(r["kind"] == k for r in recs) for k in SPEC.kinds}
        assert counted == summary["counts"][split] == SPEC.counts(n)
        assert all(v >= 1 for v in counted.values()), counted  # every kind present
        assert len({r["id"] for r in recs}) == n
    assert summary["media"] == str(out / "media")


def test_files_exist_and_nothing_half_written(dataset):
    out, summary = dataset
    assert Path(summary["train"]).is_file() and Path(summary["eval"]).is_file()
    readme = (out / "README.txt").read_text()
    assert "media_root" in readme and QUESTION_COLOUR in readme
    assert not list(out.rglob("*.tmp"))
    for split in ("train", "eval"):
        for rec in _records(out / f"{split}.jsonl"):
            for rel in _media_paths(rec):
                assert not Path(rel).is_absolute()
                assert (out / rel).stat().st_size > 0, rel


def test_records_resolve_against_the_default_media_root(dataset):
    """Relative to the dataset file's folder, the documented default: no data.media_root needed."""
    out, _ = dataset
    for split in ("train", "eval"):
        records = read_records(out / f"{split}.jsonl")  # checks that every media file exists
        media = [p for r in records for p in (*r.images, *r.videos, *r.audios)]
        assert media and all(p.is_relative_to(out / "media") for p in media)


def test_record_format(dataset):
    out, _ = dataset
    placeholder = {"image": "<image>", "video": "<video>", "audio": "<speech>"}
    for rec in _records(out / "train.jsonl") + _records(out / "eval.jsonl"):
        convo = rec["conversations"]
        assert [t["from"] for t in convo] == ["human", "gpt"] * (len(convo) // 2)
        assert rec["answer"] == convo[-1]["value"]
        text = "".join(t["value"] for t in convo if t["from"] == "human")
        kind = rec["kind"]
        if kind in ("image", "video"):
            assert convo[0]["value"] == f"{placeholder[kind]}\n{QUESTION_COLOUR}"
            assert rec["answer"] in COLOURS
        elif kind == "audio":
            assert convo[0]["value"] == f"<speech>\n{QUESTION_PITCH}"
            assert rec["answer"] in PITCHES
        elif kind == "multi_image":
            assert len(rec["image"]) == 2 and text.count("<image>") == 2
            assert rec["colours"][1] == convo[1]["value"] and rec["colours"][0] != rec["colours"][1]
        else:
            assert not _media_paths(rec) and "<" not in text
            assert rec["answer"] in COLOURS or rec["answer"] in PITCHES
        for t in convo:
            if t["from"] == "gpt":
                assert t["value"] in COLOURS or t["value"] in PITCHES


def test_text_answers_are_correct(dataset):
    out, _ = dataset
    for rec in _records(out / "train.jsonl"):
        if rec["kind"] != "text":
            continue
        q = rec["conversations"][0]["value"]
        word = q.split(" comes ")[1].split()[1]
        order = list(COLOURS) if "colour" in q else list(PITCHES)
        step = 1 if " after " in q else -1
        assert rec["answer"] == order[order.index(word) + step]


def test_image_content_matches_answer(dataset):
    out, _ = dataset
    checked = 0
    for rec in _records(out / "train.jsonl") + _records(out / "eval.jsonl"):
        if rec["kind"] == "image":
            pairs = [(rec["image"], rec["answer"])]
        elif rec["kind"] == "multi_image":
            pairs = list(zip(rec["image"], rec["colours"], strict=True))
        else:
            continue
        for rel, colour in pairs:
            img = np.asarray(load_image(out / rel))
            assert img.shape == (SPEC.size, SPEC.size, 3)
            assert dominant_palette_colour(img) == colour, rel
            checked += 1
    assert checked >= 5


def test_video_decodes_shows_colour_and_moves(dataset):
    out, _ = dataset
    videos = [r for r in _records(out / "train.jsonl") if r["kind"] == "video"]
    assert videos
    for rec in videos:
        clip = load_video(out / rec["video"], VideoSampling(num_frames=SPEC.video_frames))
        assert clip.num_source_frames == SPEC.video_frames
        assert clip.native_fps == pytest.approx(SPEC.video_fps)
        target = np.array(COLOURS[rec["answer"]], dtype=np.float64)
        centres = []
        for frame in clip.frames:
            assert dominant_palette_colour(frame) == rec["answer"]
            near = np.linalg.norm(frame.astype(np.float64) - target, axis=2) < 50
            assert near.sum() > 40  # the ball is at least ~pi*6.4^2 px, minus edges
            ys, xs = np.nonzero(near)
            centres.append((xs.mean(), ys.mean()))
        step = np.linalg.norm(np.diff(np.array(centres), axis=0), axis=1)
        assert np.median(step) > 1.0  # 3-8% of 64 px per frame, bounces aside


def test_audio_pitch_matches_answer(dataset):
    out, _ = dataset
    audio = [r for r in _records(out / "train.jsonl") + _records(out / "eval.jsonl")
             if r["kind"] == "audio"]
    assert audio
    for rec in audio:
        wave = load_audio(out / rec["audio"])
        assert len(wave) == 16000 and 0.2 < np.abs(wave).max() <= 1.0
        spec = np.abs(np.fft.rfft(wave))
        peak = np.fft.rfftfreq(len(wave), 1 / 16000)[spec.argmax()]
        assert abs(peak / PITCHES[rec["answer"]] - 1) < 0.05


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".mp4"}


def test_deterministic_for_a_seed(dataset, tmp_path):
    out, _ = dataset
    make_dataset(tmp_path, SPEC)
    # JSONL, PNG, WAV and README are byte-identical (mp4 muxers may stamp metadata).
    assert _digest(tmp_path) == _digest(out)


def _png_hashes(images: Path, pattern: str = "*.png") -> set[bytes]:
    return {hashlib.sha256(p.read_bytes()).digest() for p in images.glob(pattern)}


def test_different_seed_differs(dataset, tmp_path):
    out, _ = dataset
    other = SyntheticSpec(n_train=SPEC.n_train, n_eval=SPEC.n_eval, seed=SPEC.seed + 1)
    make_dataset(tmp_path, other)
    assert (tmp_path / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()
    assert not _png_hashes(out / "media/images") & _png_hashes(tmp_path / "media/images")


def test_eval_is_a_different_draw(dataset):
    out, _ = dataset
    images = out / "media" / "images"
    train, evals = _png_hashes(images, "train_*.png"), _png_hashes(images, "eval_*.png")
    assert train and evals and not train & evals


def test_multi_turn_records_exist(tmp_path):
    spec = SyntheticSpec(n_train=4, n_eval=0, kinds=("multi_image",), seed=5)
    make_dataset(tmp_path, spec)
    recs = _records(tmp_path / "train.jsonl")
    assert sorted(len(r["conversations"]) for r in recs) == [2, 2, 4, 4]
    for rec in recs:
        if len(rec["conversations"]) == 4:
            assert rec["answer"] == rec["colours"][0]
    assert (tmp_path / "eval.jsonl").read_text() == ""


def test_counts_split_exactly():
    spec = SyntheticSpec()
    for n in range(0, 200, 7):
        counts = spec.counts(n)
        assert sum(counts.values()) == n and set(counts) == set(KINDS)
        if n >= len(KINDS):
            assert min(counts.values()) >= 1
    assert spec.counts(600) == {"image": 210, "video": 210, "audio": 60, "multi_image": 60, "text": 60}


@pytest.mark.parametrize(
    "kwargs",
    [{"size": 15}, {"size": 63}, {"kinds": ("image", "gif")}, {"kinds": ()},
     {"kinds": ("image",), "weights": {"image": 0.0}}, {"n_train": -1}, {"video_frames": 0}],
)
def test_spec_validation(kwargs):
    with pytest.raises(ValueError):
        SyntheticSpec(**kwargs)


def test_render_image_colour_and_palette_helper():
    rng = np.random.default_rng(0)
    for name in COLOURS:
        assert dominant_palette_colour(render_image(rng, name)) == name
    assert dominant_palette_colour(np.full((8, 8, 3), 128, dtype=np.uint8)) is None


def test_vocabulary_text_keeps_answer_words_single_tokens():
    text = vocabulary_text()
    joined = "\n".join(text)
    for word in [*COLOURS, *PITCHES]:
        assert f" {word}" in joined
    for question in (QUESTION_COLOUR, QUESTION_PITCH):
        assert question in joined
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer=trainer)
    for word in [*COLOURS, *PITCHES]:
        assert len(tok.encode(f" {word}").ids) == 1, word


# ---------------------------------------------------------------- caption records

CAPTION_SPEC = SyntheticSpec(n_train=20, n_eval=10, size=32, seed=4, caption_share=0.5)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("captions")
    make_dataset(out, CAPTION_SPEC)
    return out


def _media_colour(out: Path, rec: dict) -> str | None:
    if rec["kind"] == "image":
        return dominant_palette_colour(np.asarray(load_image(out / rec["image"])))
    clip = load_video(out / rec["video"], VideoSampling(num_frames=CAPTION_SPEC.video_frames))
    return dominant_palette_colour(clip.frames[0])


def test_caption_records(captioned):
    question = {"image": QUESTION_DESCRIBE_IMAGE, "video": QUESTION_DESCRIBE_VIDEO}
    templates: dict[str, set[str]] = {"image": set(), "video": set()}
    for split, n in (("train", CAPTION_SPEC.n_train), ("eval", CAPTION_SPEC.n_eval)):
        recs = _records(captioned / f"{split}.jsonl")
        caps = [r for r in recs if r.get("caption")]
        counts = CAPTION_SPEC.counts(n)
        expected = {k: int(counts[k] * 0.5 + 0.5) for k in ("image", "video")}
        assert CAPTION_SPEC.captions(n) == expected and min(expected.values()) >= 1
        assert {k: sum(r["kind"] == k for r in caps) for k in expected} == expected
        assert all("references" not in r for r in recs if not r.get("caption"))
        for rec in caps:
            kind, answer, refs = rec["kind"], rec["answer"], rec["references"]
            assert rec["conversations"] == [
                {"from": "human", "value": f"<{kind}>\n{question[kind]}"},
                {"from": "gpt", "value": answer}]
            colour = _media_colour(captioned, rec)
            assert colour in COLOURS, rec["id"]
            assert answer in [c.format(colour) for c in CAPTIONS[kind]]
            assert len(refs) >= 2 and len(set(refs)) == len(refs) and answer not in refs
            assert all(isinstance(r, str) and f" {colour} " in f" {r} " for r in refs)
            assert sorted([answer, *refs]) == sorted(c.format(colour) for c in CAPTIONS[kind])
            templates[kind].add(answer.replace(colour, "{}"))
        assert read_records(captioned / f"{split}.jsonl")  # the reader takes them
    assert all(len(t) >= 2 for t in templates.values()), templates  # answers mix templates
    readme = (captioned / "README.txt").read_text()
    assert QUESTION_DESCRIBE_IMAGE in readme and "'references'" in readme


def test_caption_templates_are_short_lower_case_sentences():
    for kind, templates in CAPTIONS.items():
        assert len(templates) >= 3, kind
        for template in templates:
            assert template.count("{}") == 1 and template == template.lower()
            assert not template.endswith(".") and len(template.split()) <= 9


def test_captions_deterministic_and_the_rest_unchanged(captioned, tmp_path):
    make_dataset(tmp_path / "again", CAPTION_SPEC)
    assert _digest(tmp_path / "again") == _digest(captioned)
    # Without captions: the same media, and every other record byte for byte.
    plain = SyntheticSpec(n_train=CAPTION_SPEC.n_train, n_eval=CAPTION_SPEC.n_eval,
                          size=CAPTION_SPEC.size, seed=CAPTION_SPEC.seed)
    make_dataset(tmp_path / "plain", plain)
    assert _digest(tmp_path / "plain" / "media") == _digest(captioned / "media")
    for split in ("train", "eval"):
        for with_caps, without in zip(_records(captioned / f"{split}.jsonl"),
                                      _records(tmp_path / "plain" / f"{split}.jsonl"), strict=True):
            if with_caps.get("caption"):
                assert f" {without['answer']} " in f" {with_caps['answer']} "
            else:
                assert with_caps == without


def test_caption_share_zero_is_todays_dataset(dataset, tmp_path):
    out, _ = dataset
    make_dataset(tmp_path, SyntheticSpec(n_train=SPEC.n_train, n_eval=SPEC.n_eval, seed=SPEC.seed,
                                         caption_share=0.0))
    assert _digest(tmp_path) == _digest(out)
    assert "caption" not in (tmp_path / "train.jsonl").read_text()


@pytest.mark.parametrize("share", [1.5, -0.1])
def test_caption_share_validation(share):
    with pytest.raises(ValueError, match="caption_share"):
        SyntheticSpec(caption_share=share)
