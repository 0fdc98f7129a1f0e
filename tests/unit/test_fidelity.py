"""Fidelity: what we feed each family is what its own processor and chat template make.

For every family's tiny checkpoint (transformers' real classes and processors, saved and loaded
as the published folders are, images split) and every media kind, the reference here is built
without our encoder: the record is mapped onto chat messages by the one rule the README states
(section "Model families"), rendered with ``processor.apply_chat_template`` and tokenized by
``processor(...)`` with the same decoded media, as inference with the model would. Our sample's
``input_ids`` (and pixels) must equal it, and its labels must still be the answers alone.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from hpc_train.data.decoding.media import VideoFrames
from hpc_train.data.encoding.tokenize import ChatEncoder, SampleMedia
from hpc_train.models.families import get_family
from tests.conftest import FAMILIES

from .test_tokenize import assert_labels_are_answers, record, rgb

PLACEHOLDER = re.compile(r"(<image>|<video>|<speech>)")


def clip(frames: int = 4, stamps: tuple[float, ...] = (0.0, 20.0, 40.0, 70.0), seed: int = 11) -> VideoFrames:
    """Frames a decoder read at ``stamps`` seconds of an 80-second 30 fps file."""
    rng = np.random.default_rng(seed)
    return VideoFrames(frames=rng.integers(0, 255, (frames, 48, 80, 3), dtype=np.uint8),
                       timestamps=np.array(stamps[:frames]), native_fps=30.0, num_source_frames=2400)


def reference(processor, family_name: str, rec, media: SampleMedia) -> dict:
    """The model's own path: the record as chat messages, its template, its processor."""
    has_video_item = get_family(family_name).video_token is not None
    queues = {"<image>": list(media.images), "<speech>": list(media.audios), "<video>": list(media.videos)}
    messages, images, videos = [], [], []
    for turn in rec.turns:
        if turn.role == "assistant":
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.text.strip()}]})
            continue
        content = []
        for piece in PLACEHOLDER.split(turn.text):
            if piece in queues:
                item = queues[piece].pop(0)
                if piece != "<video>":
                    content.append({"type": "image"})
                    images.append(item)
                elif has_video_item:
                    content.append({"type": "video"})
                    videos.append(item)
                else:  # a template without video items: one image item per frame
                    content += [{"type": "image"}] * len(item.frames)
                    images += [Image.fromarray(f) for f in item.frames]
            elif piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": turn.role, "content": content or [{"type": "text", "text": ""}]})
    prompt = processor.apply_chat_template(messages, tokenize=False)
    bos = processor.tokenizer.bos_token
    kwargs = {"text": [prompt], "return_tensors": "pt", "add_special_tokens": not (bos and prompt.startswith(bos))}
    if images:
        kwargs["images"] = [images]
        if not has_video_item and media.videos and not media.images and not media.audios:
            kwargs["do_image_splitting"] = False  # a frame is one tile (data.video.split_frames=false)
    if videos:
        kwargs["videos"] = [v.frames for v in videos]
        if family_name == "smolvlm2":  # the frames as decoded, at the times and fps of the file
            from transformers.video_utils import VideoMetadata

            kwargs["video_metadata"] = [VideoMetadata(total_num_frames=v.num_source_frames, fps=v.native_fps,
                                                      duration=v.num_source_frames / v.native_fps,
                                                      frames_indices=[round(t * v.native_fps) for t in v.timestamps])
                                        for v in videos]
            kwargs["do_sample_frames"] = False
    return processor(**kwargs)


CASES = {
    "text": (record(("user", "Which colour comes after red?"), ("assistant", "green")), {}),
    "image": (record(("user", "<image>\nWhat colour is the ball?"), ("assistant", "red"), images=1),
              {"images": [rgb(1, 100, 70)]}),
    "multi_image": (record(("user", "<image> then <image>: which is larger?"), ("assistant", "the second"),
                           images=2), {"images": [rgb(1), rgb(2, 64, 64)]}),
    "video": (record(("user", "<video>\nWhat colour is the ball?"), ("assistant", "yellow"), videos=1),
              {"videos": [clip()]}),
    "audio": (record(("user", "<speech>\nHow high is the tone?"), ("assistant", "high"), audios=1),
              {"audios": [rgb(3, 64, 64)]}),
    # late, fractional frame times in the second clip
    "two_videos": (record(("user", "<video> then <video>: what moved?"), ("assistant", "the ball"), videos=2),
                   {"videos": [clip(3), clip(3, (12.5, 33.3, 61.9), seed=12)]}),
    "mixed": (record(("system", "Answer briefly."), ("user", "<image> and <video>?"), ("assistant", "red, then blue"),
                     ("user", "<speech> and <image>"), ("assistant", "low"), images=2, videos=1, audios=1),
              {"images": [rgb(4, 90, 60), rgb(5)], "videos": [clip(3)], "audios": [rgb(6, 64, 64)]}),
}


@pytest.fixture(scope="module")
def processors(loaded_tiny, tmp_path_factory) -> dict:
    """Each family's processor loaded from a saved folder, images split as published (the session's
    tiny SmolVLM does not split, to keep other tests cheap: a splitting one is saved here)."""
    from transformers import AutoProcessor

    from hpc_train.models.tiny import save_tiny

    folder = save_tiny("smolvlm", tmp_path_factory.mktemp("smolvlm_split"), image_splitting=True)
    splitting = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert splitting.image_processor.do_image_splitting
    return {**{family: loaded_tiny[family][1] for family in FAMILIES}, "smolvlm": splitting}


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_input_ids_are_the_model_processors(processors, family, kind):
    processor = processors[family]
    rec, media_kwargs = CASES[kind]
    media = SampleMedia(**media_kwargs)
    ours = ChatEncoder(processor, get_family(family)).encode(rec, media)
    theirs = reference(processor, family, rec, media)
    assert ours.input_ids.tolist() == theirs["input_ids"][0].tolist()
    assert_labels_are_answers(ChatEncoder(processor, get_family(family)), rec, ours)
    pixels = {"pixel_values", "pixel_values_videos"}
    assert pixels & set(ours.media) == pixels & set(theirs)
    if family != "smolvlm2" or kind not in ("mixed", "two_videos"):  # see the test of items in token order
        for key, value in theirs.items():
            if key in ours.media:
                expect = value[0] if family in ("smolvlm", "smolvlm2") else value  # Idefics3's have a batch dim
                assert torch.equal(ours.media[key], expect.to(ours.media[key].dtype)), key


def test_smolvlm2_feeds_a_video_as_published_timestamps_and_one_tile_a_frame(loaded_tiny):
    processor = loaded_tiny["smolvlm2"][1]
    rec, media_kwargs = CASES["video"]
    sample = ChatEncoder(processor, get_family("smolvlm2")).encode(rec, SampleMedia(**media_kwargs))
    text = processor.tokenizer.decode(sample.input_ids)
    assert "You are provided the following series of four frames from a 0:01:20 [H:MM:SS] video." in text
    assert [m.group(1) for m in re.finditer(r"Frame from (\d\d:\d\d):", text)] == ["00:00", "00:20", "00:40", "01:10"]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((sample.input_ids == image_id).sum()) == 4 * processor.image_seq_len  # no tiles: one image a frame
    assert sample.media["pixel_values"].shape[0] == 4
    assert sample.media["tile_frames"].tolist() == [[0, 4], [1, 4], [2, 4], [3, 4]]
    rec, media_kwargs = CASES["two_videos"]  # the second clip's frames at 12.5, 33.3 and 61.9 s
    text = processor.tokenizer.decode(ChatEncoder(processor, get_family("smolvlm2")).encode(
        rec, SampleMedia(**media_kwargs)).input_ids)
    assert text.count("series of three frames from a 0:01:20") == 2
    assert re.findall(r"Frame from (\d\d:\d\d):", text)[3:] == ["00:12", "00:33", "01:01"]


def test_smolvlm2_mixed_sample_has_each_items_pixels_in_token_order(loaded_tiny):
    """Its processor returns images and video frames under one ``pixel_values`` (the videos' win)
    and a sample's videos as a batch of videos; ours are each item processed alone, in the order
    of their tokens."""
    processor = loaded_tiny["smolvlm2"][1]
    encoder = ChatEncoder(processor, get_family("smolvlm2"))
    image, first, second = rgb(4, 90, 60), clip(3), clip(3, (12.5, 33.3, 61.9), seed=12)
    rec = record(("user", "<video>, <image> and <video>?"), ("assistant", "red"), images=1, videos=2)
    mixed = encoder.encode(rec, SampleMedia(images=[image], videos=[first, second]))

    def alone(kind: str, **media: list) -> torch.Tensor:
        one = record(("user", f"<{kind}>"), ("assistant", "red"), **{f"{kind}s": 1})
        return encoder.encode(one, SampleMedia(**media)).media["pixel_values"]

    parts = [alone("video", videos=[first]), alone("image", images=[image]), alone("video", videos=[second])]
    assert torch.equal(mixed.media["pixel_values"], torch.cat(parts))
    tiles = len(parts[1])
    video = [[0, 3], [1, 3], [2, 3]]
    assert mixed.media["tile_frames"].tolist() == video + [[-1, 0]] * tiles + video


def test_smolvlm2_refuses_videos_of_different_frame_counts_in_one_sample(loaded_tiny):
    """Its processor would write the longest video's count into every video's intro line."""
    from hpc_train.errors import DataError

    encoder = ChatEncoder(loaded_tiny["smolvlm2"][1], get_family("smolvlm2"))
    rec = record(("user", "<video> then <video>"), ("assistant", "the ball"), videos=2)
    with pytest.raises(DataError, match=r"hand.jsonl:7 \[id r1\]: its 2 videos have 3 and 4 frames.*"
                                        r"Fix: give every video the same count \(data.video.sampling=uniform "
                                        r"data.video.num_frames=3\)"):
        encoder.encode(rec, SampleMedia(videos=[clip(3), clip(4)]))


def test_smolvlm_frames_are_one_tile_unless_split_frames(processors):
    splitting = processors["smolvlm"]
    rec, media_kwargs = CASES["video"]
    media = SampleMedia(**media_kwargs)
    one = ChatEncoder(splitting, get_family("smolvlm")).encode(rec, media)
    split = ChatEncoder(splitting, get_family("smolvlm"), split_frames=True).encode(rec, media)
    assert one.media["pixel_values"].shape[0] == 4
    assert split.media["pixel_values"].shape[0] > 4 * 2  # every 80x48 frame: tiles and a global image
    assert len(split) > len(one)


def test_a_smolvlm2_folder_in_the_published_file_layout_is_fed_the_same(tiny_model_dirs, loaded_tiny, tmp_path):
    """The hub folders predate transformers 5's processor_config.json: image and video settings in
    preprocessor_config.json (``video_sampling``), ``image_seq_len`` alone in processor_config.json,
    chat_template.json. Such a folder loads as SmolVLM2 and encodes a video sample as ours does."""
    import json
    import shutil

    from hpc_train.config import ModelConfig
    from hpc_train.models.load import load_processor, model_family

    folder = tmp_path / "published"
    shutil.copytree(tiny_model_dirs["smolvlm2"], folder)
    saved = json.loads((folder / "processor_config.json").read_text())
    image = saved["image_processor"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        **image, "processor_class": "SmolVLMProcessor",
        "video_sampling": {"fps": 1, "max_frames": 64, "video_size": image["max_image_size"]}}))
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": saved["image_seq_len"],
                                                               "processor_class": "SmolVLMProcessor"}))
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    model = ModelConfig(path=str(folder))
    assert model_family(model).name == "smolvlm2"
    published = load_processor(model)
    assert published.image_processor.do_image_splitting and published.video_processor.fps == 1
    for kind in ("video", "mixed", "image"):
        rec, media_kwargs = CASES[kind]
        media = SampleMedia(**media_kwargs)
        ours = ChatEncoder(loaded_tiny["smolvlm2"][1], get_family("smolvlm2")).encode(rec, media)
        theirs = ChatEncoder(published, get_family("smolvlm2")).encode(rec, media)
        assert theirs.input_ids.tolist() == ours.input_ids.tolist(), kind
