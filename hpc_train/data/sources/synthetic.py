"""A small, real, learnable multimodal dataset for smoke tests and tiny-model training.

Images and videos show one coloured ball on a noisy tinted background ("What colour is
the ball?"), audio clips are pure tones ("How high is the tone?"), multi-image records
ask about one of two pictures (some with a second turn), and text records ask for the
next / previous word in a fixed list.  ``caption_share`` of the image and video records ask
for a caption sentence instead ("references": the other right sentences).  Everything is
drawn from numpy generators seeded by ``(seed, split, index)``, so a seed always gives
byte-identical JSONL files and the eval split is an independent draw from train.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
from PIL import Image

from hpc_train.data.sources.records import RECORD_KINDS
from hpc_train.synthetic_words import (
    CAPTIONS,
    COLOURS,
    PITCHES,
    QUESTION_COLOUR,
    QUESTION_COLOUR_AFTER,
    QUESTION_COLOUR_BEFORE,
    QUESTION_DESCRIBE_IMAGE,
    QUESTION_DESCRIBE_VIDEO,
    QUESTION_FIRST,
    QUESTION_PITCH,
    QUESTION_PITCH_AFTER,
    QUESTION_SECOND,
)

KINDS = RECORD_KINDS
SPLITS = ("train", "eval")
AUDIO_SAMPLE_RATE = 16000
AUDIO_SECONDS = 1.0
# Least RGB distance between the background's mean colour and the ball colour.
_MIN_CONTRAST = 80.0


@dataclass
class SyntheticSpec:
    """Size and mix of the synthetic dataset (weights are relative, per kind)."""

    n_train: int = 600
    n_eval: int = 120
    size: int = 64
    video_frames: int = 8
    video_fps: int = 4
    kinds: tuple[str, ...] = KINDS
    weights: dict[str, float] = field(default_factory=lambda: {
        "image": 0.35, "video": 0.35, "audio": 0.1, "multi_image": 0.1, "text": 0.1})
    seed: int = 0
    caption_share: float = 0.0  # of the image and of the video records: caption records

    def __post_init__(self) -> None:
        if self.n_train < 0 or self.n_eval < 0:
            raise ValueError("n_train and n_eval must be >= 0")
        if self.size < 16 or self.size % 2:
            # mp4v / yuv420 needs even frame sizes; under 16 px the ball is a few pixels.
            raise ValueError(f"size must be an even number >= 16, got {self.size}")
        if self.video_frames < 1 or self.video_fps < 1:
            raise ValueError("video_frames and video_fps must be >= 1")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct names from {KINDS}, got {self.kinds}")
        bad = [k for k in self.kinds if not self.weights.get(k, 0) > 0]
        if bad:
            raise ValueError(f"weights must be > 0 for every kind; missing or <= 0: {bad}")
        if not 0.0 <= self.caption_share <= 1.0:
            raise ValueError(f"caption_share must be between 0 and 1, got {self.caption_share}")

    def counts(self, n: int) -> dict[str, int]:
        """Exact records per kind for ``n`` records: largest-remainder rounding, and
        at least one of each kind when ``n >= len(kinds)``."""
        total = sum(self.weights[k] for k in self.kinds)
        raw = [n * self.weights[k] / total for k in self.kinds]
        out = [math.floor(r) for r in raw]
        # Stable sort keeps ties in `kinds` order, so rounding is deterministic.
        order = sorted(range(len(raw)), key=lambda i: out[i] - raw[i])
        for i in order[: n - sum(out)]:
            out[i] += 1
        # Tiny smoke-test sets should still contain every kind when there is room.
        if n >= len(out):
            for i in range(len(out)):
                if out[i] == 0:
                    out[max(range(len(out)), key=out.__getitem__)] -= 1
                    out[i] = 1
        return dict(zip(self.kinds, out, strict=True))

    def captions(self, n: int) -> dict[str, int]:
        """Caption records per media kind for ``n`` records (``caption_share``, halves up)."""
        return {k: math.floor(self.caption_share * c + 0.5)
                for k, c in self.counts(n).items() if k in CAPTIONS}


# ---------------------------------------------------------------- drawing

def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Tinted grey with a linear gradient, float (H, W, 3); noise is added per frame."""
    level = rng.uniform(40, 200)
    tint = rng.normal(0.0, 20.0, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0, 60)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size - 0.5
    ramp = strength * (xx * math.cos(angle) + yy * math.sin(angle))
    return level + tint[None, None, :] + ramp[:, :, None]


def _ball_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    jitter = rng.integers(-12, 13, size=3)
    return np.clip(np.array(COLOURS[name]) + jitter, 0, 255).astype(np.float64)


def _scene(rng: np.random.Generator, colour: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Background and ball colour, redrawing the background (rare, a ~3 sigma tint) when
    its mean is so close to the ball colour that the ball would be hard to see."""
    col = _ball_colour(rng, colour)
    for _ in range(20):
        bg = _background(rng, size)
        if np.linalg.norm(bg.mean(axis=(0, 1)) - col) > _MIN_CONTRAST:
            break
    return bg, col


def _draw(background: np.ndarray, colour: np.ndarray, cx: float, cy: float, r: float,
          rng: np.random.Generator) -> np.ndarray:
    size = background.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    img = np.where(inside[:, :, None], colour[None, None, :], background)
    img = img + rng.normal(0.0, 10.0, size=img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_image(rng: np.random.Generator, colour: str, size: int = 64) -> np.ndarray:
    """One (size, size, 3) uint8 RGB picture of a ball of ``colour``."""
    bg, col = _scene(rng, colour, size)
    r = rng.uniform(0.10, 0.22) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    return _draw(bg, col, cx, cy, r, rng)


def render_video(rng: np.random.Generator, colour: str, size: int = 64,
                 frames: int = 8) -> np.ndarray:
    """(frames, size, size, 3) uint8 RGB of the ball moving linearly, bouncing off edges."""
    bg, col = _scene(rng, colour, size)
    r = rng.uniform(0.10, 0.22) * size
    pos = rng.uniform(r, size - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    vel = rng.uniform(0.03, 0.08) * size * np.array([math.cos(angle), math.sin(angle)])
    lo, hi = r, size - r
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        out[t] = _draw(bg, col, pos[0], pos[1], r, rng)
        pos = pos + vel
        for axis in range(2):  # reflect about the wall it crossed
            if pos[axis] < lo:
                pos[axis], vel[axis] = 2 * lo - pos[axis], -vel[axis]
            elif pos[axis] > hi:
                pos[axis], vel[axis] = 2 * hi - pos[axis], -vel[axis]
    return out


def render_tone(rng: np.random.Generator, pitch: str,
                sample_rate: int = AUDIO_SAMPLE_RATE, seconds: float = AUDIO_SECONDS) -> np.ndarray:
    """Mono float32 sine at the label's pitch with a small detune, random level and noise."""
    n = int(round(sample_rate * seconds))
    freq = PITCHES[pitch] * (1.0 + rng.uniform(-0.03, 0.03))
    amp = rng.uniform(0.3, 0.8)
    t = np.arange(n) / sample_rate
    wave = amp * np.sin(2 * math.pi * freq * t + rng.uniform(0, 2 * math.pi))
    fade = min(n // 2, int(0.01 * sample_rate))  # 10 ms ramps avoid clicks at the ends
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        wave[:fade] *= ramp
        wave[-fade:] *= ramp[::-1]
    wave = wave + rng.normal(0.0, 0.01, size=n)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def dominant_palette_colour(pixels: np.ndarray, *, min_chroma: float = 80.0,
                            max_distance: float = 60.0) -> str | None:
    """Name of the ball's palette colour in an (H, W, 3) picture, or None if unsure.

    A sanity check for generated data.  Counted pixels must be saturated (chroma >=
    ``min_chroma``) and unlike the background, estimated as the image's median colour
    (the ball covers under 16% of it): a strongly tinted background can itself sit near
    a palette colour.  The palette colour most counted pixels are close to wins.
    """
    px = np.asarray(pixels, dtype=np.float64).reshape(-1, 3)
    background = np.median(px, axis=0)
    saturated = (px.max(axis=1) - px.min(axis=1)) >= min_chroma
    unlike_bg = np.linalg.norm(px - background, axis=1) > max_distance
    px = px[saturated & unlike_bg]
    if not len(px):
        return None
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    dist = np.linalg.norm(px[:, None, :] - palette[None, :, :], axis=2)
    nearest = dist.argmin(axis=1)
    close = nearest[dist.min(axis=1) <= max_distance]
    if not len(close):
        return None
    return list(COLOURS)[int(np.bincount(close, minlength=len(palette)).argmax())]


# ---------------------------------------------------------------- writing

def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG")


def _save_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    size = (frames.shape[2], frames.shape[1])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), size)
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot write mp4v to {path}; is OpenCV built with FFmpeg?")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def _turn(who: str, value: str) -> dict[str, str]:
    return {"from": who, "value": value}


def _balanced(rng: np.random.Generator, labels: list[str], n: int) -> list[str]:
    """n labels with counts as even as possible, in random order."""
    return [labels[i] for i in rng.permutation(np.resize(np.arange(len(labels)), n))]


def _text_question(rng: np.random.Generator) -> tuple[str, str]:
    names, pitches = list(COLOURS), list(PITCHES)
    form = int(rng.integers(0, 3))
    if form == 0:
        i = int(rng.integers(0, len(names) - 1))
        return QUESTION_COLOUR_AFTER.format(names[i]), names[i + 1]
    if form == 1:
        i = int(rng.integers(1, len(names)))
        return QUESTION_COLOUR_BEFORE.format(names[i]), names[i - 1]
    i = int(rng.integers(0, len(pitches) - 1))
    return QUESTION_PITCH_AFTER.format(pitches[i]), pitches[i + 1]


def _caption_plan(spec: SyntheticSpec, split_code: int, kinds: list[str]) -> dict[int, str]:
    """{record index: template}; own generator, so caption_share 0 changes no other draw."""
    rng = np.random.default_rng([spec.seed, split_code, 2])
    plan: dict[int, str] = {}
    for kind, m in spec.captions(len(kinds)).items():
        where = rng.choice([i for i, k in enumerate(kinds) if k == kind], size=m, replace=False)
        plan.update(zip(where.tolist(), _balanced(rng, list(CAPTIONS[kind]), m), strict=True))
    return plan


def _media_record(kind: str, rid: str, label: str, rng: np.random.Generator, spec: SyntheticSpec,
                  out: Path, nth: int, template: str | None) -> tuple[dict, list[dict[str, str]]]:
    """Writes one record's media; its fields and turns (a ``template``: a caption record)."""
    if kind in ("image", "video"):
        rel = f"media/{kind}s/{rid}.{'png' if kind == 'image' else 'mp4'}"
        if kind == "image":
            _save_png(render_image(rng, label, spec.size), out / rel)
        else:
            frames = render_video(rng, label, spec.size, spec.video_frames)
            _save_mp4(frames, out / rel, spec.video_fps)
        fields, question, answer = {kind: rel}, QUESTION_COLOUR, label
        if template is not None:  # a caption record
            question = QUESTION_DESCRIBE_IMAGE if kind == "image" else QUESTION_DESCRIBE_VIDEO
            answer, said = template.format(label), [c.format(label) for c in CAPTIONS[kind]]
            fields.update(caption=True, references=[c for c in said if c != answer])
        return fields, [_turn("human", f"<{kind}>\n{question}"), _turn("gpt", answer)]
    if kind == "audio":
        rel = f"media/audio/{rid}.wav"
        sf.write(out / rel, render_tone(rng, label), AUDIO_SAMPLE_RATE, subtype="PCM_16")
        return {"audio": rel}, [_turn("human", "<speech>\n" + QUESTION_PITCH), _turn("gpt", label)]
    if kind == "multi_image":
        # A different first colour, so answering needs the right picture.
        first = str(rng.choice([c for c in COLOURS if c != label]))
        rels = [f"media/images/{rid}_1.png", f"media/images/{rid}_2.png"]
        for colour, rel in zip((first, label), rels, strict=True):
            _save_png(render_image(rng, colour, spec.size), out / rel)
        convo = [_turn("human", "<image>\n<image>\n" + QUESTION_SECOND), _turn("gpt", label)]
        if nth % 2 == 0:  # every second one, so any split with 2+ has multi-turn data
            convo += [_turn("human", QUESTION_FIRST), _turn("gpt", first)]
        return {"image": rels, "colours": [first, label]}, convo
    question, answer = _text_question(rng)
    return {}, [_turn("human", question), _turn("gpt", answer)]


def _make_split(split: str, n: int, spec: SyntheticSpec, out: Path) -> list[dict]:
    """Records whose media paths are relative to ``out`` (the dataset files' folder, the default
    ``data.media_root``)."""
    split_code = SPLITS.index(split)
    plan_rng = np.random.default_rng([spec.seed, split_code, 0])
    counts = spec.counts(n)
    kinds = [k for k in spec.kinds for _ in range(counts[k])]
    kinds = [kinds[i] for i in plan_rng.permutation(len(kinds))]
    # Balanced labels per kind so a constant guess cannot score well on eval.
    label_pool = {k: _balanced(plan_rng, list(PITCHES if k == "audio" else COLOURS), counts[k])
                  for k in spec.kinds}
    captions = _caption_plan(spec, split_code, kinds)
    records = []
    seen: Counter[str] = Counter()
    for i, kind in enumerate(kinds):
        seen[kind] += 1
        # Own generator per record: content depends only on (seed, split, index).
        rng = np.random.default_rng([spec.seed, split_code, 1, i])
        rid = f"{split}_{i:05d}"
        fields, convo = _media_record(kind, rid, label_pool[kind].pop(), rng, spec, out,
                                      seen[kind], captions.get(i))
        records.append({"id": rid, "kind": kind, **fields, "conversations": convo,
                        "answer": convo[-1]["value"]})  # answer of the last turn
    return records


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _readme(spec: SyntheticSpec, counts: dict[str, dict[str, int]]) -> str:
    lines = [
        "Synthetic multimodal dataset written by hpc_train.data.sources.synthetic.make_dataset.",
        "",
        "train.jsonl / eval.jsonl: LLaVA-style records; media paths (media/...) are relative to",
        "this folder, the default data.media_root: data.train=<this folder>/train.jsonl is enough.",
        "",
        f"- image: {spec.size}x{spec.size} PNG of one ball; '<image>\\n{QUESTION_COLOUR}' -> colour",
        f"- video: mp4 (mp4v), {spec.video_frames} frames at {spec.video_fps} fps, the ball moves",
        "  and bounces off the edges; '<video>\\n...' -> colour",
        f"- audio: {AUDIO_SECONDS:g} s {AUDIO_SAMPLE_RATE} Hz mono wav of a tone;",
        f"  '<speech>\\n{QUESTION_PITCH}' -> one of {', '.join(f'{k} ({v:g} Hz)' for k, v in PITCHES.items())}",
        f"- multi_image: two pictures; '{QUESTION_SECOND}' -> colour of picture 2,",
        f"  every second one adds a turn '{QUESTION_FIRST}'",
        f"- text: no media, 'Which colour comes after X in the list {', '.join(COLOURS)}?' and similar",
        *([f"- captions ({spec.caption_share:g} of image and of video records, 'caption': true):",
           f"  '{QUESTION_DESCRIBE_IMAGE}' / '{QUESTION_DESCRIBE_VIDEO}' -> a sentence naming the",
           "  colour; 'references' lists the other right sentences"]
          if spec.caption_share > 0 else []),
        "",
        f"Colours: {', '.join(COLOURS)}. Every record has 'kind' and 'answer' (last turn's answer).",
        f"seed={spec.seed}; eval is an independent draw (different seed stream) from train.",
        "",
        "Counts:",
    ]
    for split, c in counts.items():
        caps = spec.captions(sum(c.values())) if spec.caption_share > 0 else {}
        lines.append(f"  {split}: " + ", ".join(f"{k}={v}" for k, v in c.items())
                     + "".join(f", {k} captions={v}" for k, v in caps.items()))
    return "\n".join(lines) + "\n"


def make_dataset(out_dir: str | Path, spec: SyntheticSpec | None = None) -> dict:
    """Write the dataset under ``out_dir`` and return a summary.

    Layout: ``train.jsonl``, ``eval.jsonl``, ``README.txt`` and
    ``media/{images,videos,audio}/``.  Media are written first and each JSONL is renamed
    into place last, so a crash never leaves a JSONL pointing at missing files.
    Files from an earlier, larger run in the same folder are left alone.
    """
    spec = spec if spec is not None else SyntheticSpec()
    out = Path(out_dir)
    media = out / "media"
    for sub in ("images", "videos", "audio"):
        (media / sub).mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    paths: dict[str, str] = {}
    for split, n in (("train", spec.n_train), ("eval", spec.n_eval)):
        records = _make_split(split, n, spec, out)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        path = out / f"{split}.jsonl"
        _write_atomic(path, text)
        counts[split] = spec.counts(n)
        paths[split] = str(path)
    _write_atomic(out / "README.txt", _readme(spec, counts))
    return {
        "out_dir": str(out),
        "media": str(media),
        "train": paths["train"],
        "eval": paths["eval"],
        "readme": str(out / "README.txt"),
        "counts": counts,
        "seed": spec.seed,
    }
