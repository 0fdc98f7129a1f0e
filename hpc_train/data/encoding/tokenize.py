"""Chat template and assistant-only labels for one record.

How the labels are made exact, for any chat template:
1. The conversation is rendered with the processor's own chat template, each assistant
   text replaced by a unique sentinel; the sentinels are then found in the rendered string
   and swapped back, which gives the character span of every assistant answer without
   assuming anything about the template's layout. The family's end-of-turn token must
   follow each answer directly; it is supervised with it, and so is a separator space
   right before the answer, which byte-level tokenizers fold into the answer's first token.
2. The processor expands media placeholders (images, videos) and tokenizes the whole text,
   as it would for inference.
3. The expanded text is cut at every answer boundary, each piece is tokenized on its own,
   and the concatenation must equal the processor's ids. Pieces inside answer spans are
   labelled with their ids; everything else, media tokens included, is -100. If the pieces
   ever disagree with the whole, the sample is refused rather than mislabelled. (A media
   expansion is no cut: SmolVLM2's begins with a word, which byte-level BPE joins to the
   space before it; its tokens are those starting inside it.)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from hpc_train.data.decoding.media import VideoFrames
from hpc_train.data.encoding.processor_media import (
    expand,
    image_rows,
    pixels_in_token_order,
    shift,
    still,
    tile_frames,
    video_inputs,
)
from hpc_train.data.sources.records import Record
from hpc_train.errors import DataError
from hpc_train.models.families import Family
from hpc_train.models.media_keys import IMAGE_ROWS, IMAGE_TILE, TILE_FRAMES

IGNORE_INDEX = -100
_PLACEHOLDER_RE = re.compile(r"(<image>|<video>|<speech>)")
_SENTINEL = "\u27e6hpc-answer-{}\u27e7"


@dataclass
class SampleMedia:
    """Decoded media of one record, each list in placeholder order."""

    images: list[Image.Image] = field(default_factory=list)
    videos: list[VideoFrames] = field(default_factory=list)
    audios: list[Image.Image] = field(default_factory=list)
    """Spectrogram pictures of the ``<speech>`` clips."""
    unprepared: int = 0
    """Videos decoded from their files because the run's prepared media lacked them."""


@dataclass
class EncodedSample:
    """One tokenized sample, ready for the collator."""

    id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    media: dict[str, torch.Tensor]
    """Family-specific media tensors without a batch dimension (see ``collate``)."""
    num_media_tokens: int
    """Tokens that came from expanding media placeholders."""
    answers: list[str]
    """The assistant texts, in order (what the labels must decode to)."""
    masked_head: int = 0
    masked_tail: int = 0
    """Leading / trailing tokens no real token attends to (blank media added for ZeRO, see collate)."""
    features: dict[str, torch.Tensor] | None = None
    """Cached feature rows per kind of media features (``data.vision_cache``); ``media`` is then
    empty: the sample's vision work is already done."""
    feature_key: str | None = None
    """The vision cache's key of a sample whose features are not cached yet: its features are
    written there once the model computes them."""
    videos_unprepared: int = 0
    """Its videos decoded from their files because the run's prepared media lacked them."""

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_text_tokens(self) -> int:
        return len(self) - self.num_media_tokens


class ChatEncoder:
    """Turns a :class:`Record` plus its decoded media into an :class:`EncodedSample`."""

    def __init__(self, processor: Any, family: Family, *, system_prompt: str | None = None,
                 split_frames: bool = False) -> None:
        """``split_frames``: a family that takes a video as a run of images (SmolVLM) has each
        frame split into tiles as an image is, instead of one tile a frame."""
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.layout = family.layout
        self.system_prompt = system_prompt
        self.split_frames = split_frames
        if getattr(processor, "chat_template", None) is None:
            raise DataError(
                "the processor has no chat template",
                fix="save the model folder with its chat_template.jinja (processor.save_pretrained)",
            )
        self._control = _control_tokens(self.tokenizer, keep=set(_PLACEHOLDER_RE.pattern[1:-1].split("|")))

    # -- public -------------------------------------------------------------------------

    def encode(self, record: Record, media: SampleMedia) -> EncodedSample:
        """Tokenize a whole conversation with labels on the assistant answers only."""
        chat = self._messages(record, media, with_answers=True)
        rendered = self._render(record, chat.messages, add_generation_prompt=False)
        text, spans = self._restore_answers(record, rendered, chat.answers)
        return self._tokenize(record, text, spans, chat)

    def encode_prompt(self, record: Record, media: SampleMedia) -> EncodedSample:
        """Tokenize the conversation up to its last answer, ending with the generation prompt.

        The last assistant turn is the reference answer (``answers[-1]``); labels are all -100.
        """
        last = max(i for i, t in enumerate(record.turns) if t.role == "assistant")
        head = dataclasses.replace(record, turns=record.turns[:last])
        chat = self._messages(head, media, with_answers=False)
        text = self._render(record, chat.messages, add_generation_prompt=True)
        sample = self._tokenize(record, text, [], chat)
        sample.answers = [record.turns[last].text]
        return sample

    def blank_media(self) -> list[EncodedSample]:
        """One blank image (and, for families with a video path, one blank one-frame video),
        each as the token snippet and media tensors the processor makes for it.

        The collator appends them to a batch that lacks that media kind, so every rank runs
        the same vision modules every step (ZeRO-3 hangs otherwise, ZeRO-2 crashes).
        """
        # Mid-grey, not black: Idefics3 treats an all-zero tile as padding and drops it.
        grey = np.full((self.family_blank_side, self.family_blank_side, 3), 128, dtype=np.uint8)
        snippets = [self._snippet("image", images=[Image.fromarray(grey)])]
        if not self.family.video_as_images:
            snippets.append(self._snippet("video", videos=[grey[None]]))
        return snippets

    @property
    def family_blank_side(self) -> int:
        """One tile's side: the blank costs the fewest tokens the processor gives an image."""
        if self.family.blank_side is not None:
            return self.family.blank_side(self.processor)
        image_processor = self.processor.image_processor
        size = getattr(image_processor, "max_image_size", None) or getattr(image_processor, "size", None) or {}
        return int(size.get("longest_edge") or size.get("height") or size.get("shortest_edge") or 64)

    def _snippet(self, kind: str, *, images: list | None = None, videos: list | None = None
                 ) -> EncodedSample:
        token = self.family.image_token if kind == "image" else self.family.video_token
        kwargs: dict[str, Any] = {"text": [token], "return_tensors": "pt", "add_special_tokens": False}
        if images:
            kwargs["images"] = [images]
            if getattr(self.processor.image_processor, "do_image_splitting", False):
                kwargs["do_image_splitting"] = False  # one tile, not a split one
        if videos:
            kwargs["videos"] = videos
            kwargs.update(video_inputs(self.family, [still(v) for v in videos]))
        out = self.processor(**kwargs)
        ids = out["input_ids"][0].long()
        return EncodedSample(id=f"<blank {kind}>", input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX),
                             media=self._media(out, [(IMAGE_TILE, 0)] * len(images or []), []),
                             num_media_tokens=len(ids), answers=[])

    # -- steps --------------------------------------------------------------------------

    def _messages(self, record: Record, media: SampleMedia, *, with_answers: bool) -> _Chat:
        chat = _Chat()
        images, videos, answers = chat.images, chat.videos, chat.answers
        messages = chat.messages
        queues = {"<image>": list(media.images), "<video>": list(media.videos),
                  "<speech>": list(media.audios)}
        self._refuse_control_tokens(record)
        if self.system_prompt and not any(t.role == "system" for t in record.turns):
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        for turn in record.turns:
            if turn.role == "assistant":
                text = turn.text.strip()
                answers.append(text)
                marker = _SENTINEL.format(len(answers) - 1) if with_answers else text
                messages.append({"role": "assistant", "content": [{"type": "text", "text": marker}]})
                continue
            content: list[dict] = []
            for piece in _PLACEHOLDER_RE.split(turn.text):
                if not piece:
                    continue
                if piece not in queues:
                    content.append({"type": "text", "text": piece})
                    continue
                if not queues[piece]:
                    raise DataError(f"more {piece} placeholders than media given", path=record.source,
                                    line=record.line, record_id=record.id,
                                    fix=f"give one media file per {piece}")
                item = queues[piece].pop(0)
                if piece == "<video>" and self.family.video_token is None:  # a run of images
                    for j, frame in enumerate(item.frames):
                        content.append({"type": "image"})
                        images.append(Image.fromarray(frame))
                        chat.image_frames.append((j, len(item.frames)))
                elif piece == "<video>":
                    content.append({"type": "video"})
                    videos.append(item)
                    if self.family.video_as_images:  # one tile a frame, in the video's replacement
                        chat.image_frames.append([(j, len(item.frames)) for j in range(len(item.frames))])
                else:
                    content.append({"type": "image"})
                    images.append(item)
                    chat.image_frames.append((IMAGE_TILE, 0))
            if not content:
                content.append({"type": "text", "text": ""})
            messages.append({"role": turn.role, "content": content})
        return chat

    def _media(self, out: Any, image_frames: list[tuple[int, int]], replacements: list[dict]
               ) -> dict[str, torch.Tensor]:
        """The layout's media tensors, with what sequence parallelism shares their encoding by:
        SmolVLM's say which video frame each tile shows (the rank that decoded a frame encodes
        it), LLaVA-OneVision's how many feature rows each image makes (LLaVA-OneVision-1.5's
        grids say it already)."""
        media = self.layout.sample(out)
        if "pixel_values" not in media:
            return media
        if self.layout.shared_by == TILE_FRAMES:
            media[TILE_FRAMES] = tile_frames(image_frames, replacements, self.family.image_token,
                                             self.processor.image_seq_len, len(media["pixel_values"]))
        elif self.layout.shared_by == IMAGE_ROWS:
            media[IMAGE_ROWS] = image_rows(replacements, self.family.image_token, out["input_ids"][0],
                                           self.tokenizer.convert_tokens_to_ids(self.family.image_token),
                                           len(media["pixel_values"]))
        return media

    def _refuse_control_tokens(self, record: Record) -> None:
        """A turn that writes the template's own tokens (``<|im_start|>``, ``<end_of_utterance>``)
        would forge turn boundaries or media slots: the labels would no longer be the answers."""
        if self._control is None:
            return
        for k, turn in enumerate(record.turns):
            found = self._control.search(turn.text)
            if found:
                raise DataError(
                    f"conversations[{k}] ({turn.role}) contains the chat template's control token {found.group()}",
                    path=record.source, line=record.line, record_id=record.id,
                    fix="remove it from the text: the chat template writes its control tokens itself")

    def _render(self, record: Record, messages: list[dict], *, add_generation_prompt: bool) -> str:
        try:
            return self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja errors carry no location of ours
            raise DataError(f"the chat template failed on this conversation: {exc}",
                            path=record.source, line=record.line, record_id=record.id,
                            fix="check the turn order (system, then alternating user/assistant)") from exc

    def _restore_answers(self, record: Record, rendered: str, answers: list[str]
                         ) -> tuple[str, list[tuple[int, int]]]:
        eot = self.family.end_of_turn
        out: list[str] = []
        spans: list[tuple[int, int]] = []
        cursor = 0
        length = 0
        for k, answer in enumerate(answers):
            sentinel = _SENTINEL.format(k)
            where = rendered.find(sentinel, cursor)
            if where < 0 or rendered.count(sentinel) != 1:
                raise DataError(
                    f"the chat template did not render assistant turn {k + 1} verbatim",
                    path=record.source, line=record.line, record_id=record.id,
                    fix="use a chat template that writes assistant text unchanged")
            before = rendered[cursor:where]
            out.append(before)
            length += len(before)
            # A template's separator space ("Assistant: red") is merged by byte-level BPE into
            # the answer's first token ("Ġred"), so it belongs to the supervised span.
            start = length - (len(before) - len(before.rstrip(" ")))
            out.append(answer)
            length += len(answer)
            cursor = where + len(sentinel)
            if not rendered.startswith(eot, cursor):
                raise DataError(
                    f"the chat template does not close assistant turn {k + 1} with {eot} "
                    f"(found {rendered[cursor:cursor + 20]!r})",
                    path=record.source, line=record.line, record_id=record.id,
                    fix=f"use the family's chat template, which ends each turn with {eot}")
            out.append(eot)
            length += len(eot)
            cursor += len(eot)
            spans.append((start, length))
        out.append(rendered[cursor:])
        return "".join(out), spans

    def _process(self, record: Record, text: str, chat: _Chat) -> Any:
        """The processor's output for the rendered ``text`` and the sample's media."""
        images, videos = chat.images, chat.videos
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False,
                                  "return_text_replacement_offsets": True}
        if images:
            # Nested per sample: LLaVA-OneVision gives a multi-image sample fewer tokens per
            # image than a single one, and only knows it is one sample when grouped.
            kwargs["images"] = [images]
            if not self.split_frames and chat.image_frames and all(
                    isinstance(tag, tuple) and tag[0] != IMAGE_TILE for tag in chat.image_frames):
                kwargs["do_image_splitting"] = False  # only video frames: one tile each
        try:
            if videos:
                kwargs["videos"] = [v.frames for v in videos]
                kwargs.update(video_inputs(self.family, videos))
            out = self.processor(**kwargs)
            if videos and self.family.video_as_images and (images or len(videos) > 1):
                out.update(pixels_in_token_order(self.processor, images, kwargs, out))
        except DataError as exc:
            raise exc.at(path=record.source, line=record.line, record_id=record.id) from None
        except Exception as exc:
            raise DataError(f"the processor rejected this sample: {exc}", path=record.source,
                            line=record.line, record_id=record.id,
                            fix="check that the media files are valid images/videos") from exc
        return out

    def _tokenize(self, record: Record, text: str, spans: list[tuple[int, int]], chat: _Chat) -> EncodedSample:
        out = self._process(record, text, chat)
        input_ids = out["input_ids"][0]
        replacements = out.get("text_replacement_offsets", [[]])
        replacements = replacements[0] if replacements else []
        expanded, cuts, media_ranges = expand(text, spans, replacements)
        pieces_ids: list[int] = []
        labels: list[int] = []
        num_media = 0
        supervised_ranges = {shift(s, replacements): shift(e, replacements) for s, e in spans}
        for start, end in zip(cuts, cuts[1:], strict=False):
            if start == end:
                continue
            piece = self.tokenizer(expanded[start:end], add_special_tokens=False, return_offsets_mapping=True)
            ids = piece["input_ids"]
            pieces_ids.extend(ids)
            if any(s <= start and end <= e for s, e in supervised_ranges.items()):
                labels.extend(ids)
            else:
                labels.extend([IGNORE_INDEX] * len(ids))
            num_media += sum(any(s <= start + first < e for s, e in media_ranges) for first, _ in piece["offset_mapping"])
        if pieces_ids != input_ids.tolist():
            raise DataError(
                "tokenizing answer spans on their own gives different tokens than the whole text, "
                "so the labels cannot be placed exactly",
                path=record.source, line=record.line, record_id=record.id,
                fix="use a tokenizer whose pre-tokenizer splits at turn boundaries (byte-level BPE does)")
        sample = EncodedSample(
            id=record.id,
            input_ids=input_ids.long(),
            labels=torch.tensor(labels, dtype=torch.long),
            media=self._media(out, chat.image_frames, replacements),
            num_media_tokens=num_media,
            answers=chat.answers,
        )
        if spans and sample.num_supervised == 0:
            raise DataError("the sample has no supervised tokens", path=record.source,
                            line=record.line, record_id=record.id,
                            fix="give the assistant turns some text")
        return sample


@dataclass
class _Chat:
    """A record as the chat template and the processor take it."""

    messages: list[dict] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    videos: list[VideoFrames] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    image_frames: list[tuple[int, int] | list[tuple[int, int]]] = field(default_factory=list)
    """Per item of image features, in order: an image's tag, ``(frame, frames)`` when it is a
    video's frame fed as an image (SmolVLM), ``(-1, 0)`` otherwise, given to each of its tiles;
    a video whose frames are image features (SmolVLM2): one tag per frame (one tile each)."""


def _control_tokens(tokenizer: Any, *, keep: set[str]) -> re.Pattern[str] | None:
    """The tokenizer's special tokens other than the media placeholders, longest first."""
    special = set(tokenizer.all_special_tokens)
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    tokens = sorted(special - keep, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None
