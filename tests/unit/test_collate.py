"""Padded mixed batches: every sample's media meet its own tokens.

The strongest check available: a batch of text-only, image, multi-image, video and audio
samples gives, for every sample, the same logits as that sample run on its own.
"""

from __future__ import annotations

import pytest
import torch

from hpc_train.config import DataConfig
from hpc_train.data.batching.collate import Collator, FloatCast, model_inputs
from hpc_train.data.dataset import MediaLoader, SampleDataset, Skipped
from hpc_train.data.encoding.tokenize import IGNORE_INDEX, ChatEncoder
from hpc_train.data.sources.records import read_records
from hpc_train.errors import DataError
from hpc_train.models.families import get_family
from tests.conftest import FAMILIES, mixed_samples


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_single_sample_forward(loaded_tiny, synthetic_data, family):
    model, processor = loaded_tiny[family]
    samples = mixed_samples(loaded_tiny, synthetic_data, family)
    collate = Collator(get_family(family), processor.tokenizer.pad_token_id)
    batch = collate(samples)
    assert batch["input_ids"].shape[0] == len(samples)
    assert batch["sample_ids"] == [s.id for s in samples]
    with torch.no_grad():
        batched = model(**model_inputs(batch), use_cache=False)
        assert torch.isfinite(batched.loss)
        for row, sample in enumerate(samples):
            alone = model(**model_inputs(collate([sample])), use_cache=False)
            n = len(sample)
            diff = (batched.logits[row, :n] - alone.logits[0, :n]).abs().max().item()
            assert diff < 1e-4, (sample.id, diff)


def test_idefics3_layout_pads_tiles_with_zeros(loaded_tiny, synthetic_data):
    samples = mixed_samples(loaded_tiny, synthetic_data, "smolvlm")
    batch = Collator(get_family("smolvlm"), 0)(samples)
    tiles = [s.media.get("pixel_values") for s in samples]
    n_max = max(t.shape[0] for t in tiles if t is not None)
    assert batch["pixel_values"].shape[:2] == (len(samples), n_max)
    assert "pixel_attention_mask" not in batch  # every real tile is whole: nothing to mask
    assert batch["pixel_values"][0].abs().sum() == 0  # the text-only row holds only padding
    for row, t in enumerate(tiles):
        if t is not None:
            assert torch.equal(batch["pixel_values"][row, : t.shape[0]], t)
    cropped = next(s for s in samples if "pixel_values" in s.media)
    mask = cropped.media["pixel_attention_mask"].clone()
    mask[0, :, -8:] = False  # a tile with padded pixels on the right
    cropped.media = {**cropped.media, "pixel_attention_mask": mask}
    batch = Collator(get_family("smolvlm"), 0)(samples)
    assert batch["pixel_attention_mask"].shape[:2] == (len(samples), n_max)
    row = samples.index(cropped)
    assert torch.equal(batch["pixel_attention_mask"][row, : mask.shape[0]], mask)


def test_llava_layout_counts_images_per_sample(loaded_tiny, synthetic_data):
    samples = mixed_samples(loaded_tiny, synthetic_data, "llava_onevision")
    batch = Collator(get_family("llava_onevision"), 0)(samples)
    counts = [s.media["pixel_values"].shape[0] if "pixel_values" in s.media else 0 for s in samples]
    assert batch["batch_num_images"].tolist() == counts
    assert batch["pixel_values"].shape[0] == sum(counts) == batch["image_sizes"].shape[0]
    assert batch["pixel_values_videos"].shape[0] == 1


def test_padding_labels_and_mask(loaded_tiny, synthetic_data):
    samples = mixed_samples(loaded_tiny, synthetic_data, "smolvlm")
    batch = Collator(get_family("smolvlm"), 0, pad_to_multiple_of=8)(samples)
    assert batch["input_ids"].shape[1] % 8 == 0
    for row, s in enumerate(samples):
        n = len(s)
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["labels"][row, :n], s.labels)


def test_skipped_samples_are_dropped_and_counted(loaded_tiny, synthetic_data):
    samples = mixed_samples(loaded_tiny, synthetic_data, "smolvlm")[:2]
    skipped = Skipped(id="gone", reason="file not found", kind="bad_record")
    batch = Collator(get_family("smolvlm"), 0)([samples[0], skipped, samples[1]])
    assert batch["num_skipped"] == 1 and batch["skipped"] == [skipped]
    assert batch["input_ids"].shape[0] == 2
    empty = Collator(get_family("smolvlm"), 0)([skipped])
    assert empty["num_skipped"] == 1 and "input_ids" not in empty


def test_llava_videos_of_different_lengths_refused(loaded_tiny, synthetic_data):
    samples = mixed_samples(loaded_tiny, synthetic_data, "llava_onevision")
    video = next(s for s in samples if "pixel_values_videos" in s.media)
    shorter = type(video)(**{**video.__dict__, "id": "short",
                             "media": {"pixel_values_videos": video.media["pixel_values_videos"][:, :2]}})
    with pytest.raises(DataError, match=r"different frame counts \[2, 4\] in one batch.*Fix: data.video.sampling=uniform data.video.num_frames=2"):
        Collator(get_family("llava_onevision"), 0)([video, shorter])


def test_dataloader_workers_decode_video_like_the_main_process(loaded_tiny, synthetic_data):
    from torch.utils.data import DataLoader

    processor = loaded_tiny["smolvlm"][1]
    cfg = DataConfig(video={"num_frames": 4})
    records = read_records(synthetic_data / "train.jsonl", media_root=cfg.media_root)
    dataset = SampleDataset(records, ChatEncoder(processor, get_family("smolvlm")), MediaLoader(cfg), cfg)
    collate = Collator(get_family("smolvlm"), processor.tokenizer.pad_token_id)

    def run(workers: int) -> list[dict]:
        loader = DataLoader(dataset, batch_size=8, num_workers=workers, collate_fn=collate)
        return list(loader)

    inline, parallel = run(0), run(2)
    assert [b["sample_ids"] for b in inline] == [b["sample_ids"] for b in parallel]
    assert sum(len(b["sample_ids"]) for b in parallel) == len(records)
    for a, b in zip(inline, parallel, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])


@pytest.mark.parametrize("family", FAMILIES)
def test_blank_media_keep_text_only_batches_running_the_vision_tower(loaded_tiny, synthetic_data, family):
    model, processor = loaded_tiny[family]
    encoder = ChatEncoder(processor, get_family(family))
    text_only = [s for s in mixed_samples(loaded_tiny, synthetic_data, family) if not s.media]
    plain = Collator(get_family(family), processor.tokenizer.pad_token_id)
    guarded = Collator(get_family(family), processor.tokenizer.pad_token_id, blanks=encoder.blank_media())
    a, b = plain(text_only), guarded(text_only)
    assert "pixel_values" not in a and "pixel_values" in b
    spec = get_family(family)
    if not spec.video_as_images:
        assert "pixel_values_videos" in b
    n = len(text_only[0])
    assert not b["attention_mask"][0, n:].any() and (b["labels"][0, n:] == IGNORE_INDEX).all()
    seen = []
    hook = getattr(spec.inner_model(model), spec.vision_model).register_forward_hook(lambda *args: seen.append(1))
    try:
        with torch.no_grad():
            out_a = model(**model_inputs(a), use_cache=False)
            assert not seen
            out_b = model(**model_inputs(b), use_cache=False)
    finally:
        hook.remove()
    assert seen, "the vision tower did not run on the guarded batch"
    # The blank changes nothing the real tokens see: same logits, same loss.
    diff = (out_a.logits[0, :n] - out_b.logits[0, :n]).abs().max().item()
    assert diff < 1e-5
    assert torch.allclose(out_a.loss, out_b.loss, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bf16_run_gets_its_pixels_cast_in_the_collator_and_nothing_else(loaded_tiny, synthetic_data, family):
    _, processor = loaded_tiny[family]
    samples = mixed_samples(loaded_tiny, synthetic_data, family)
    collate = Collator(get_family(family), processor.tokenizer.pad_token_id)
    plain, cast = collate(samples), FloatCast(collate, torch.bfloat16)(samples)
    assert plain.keys() == cast.keys()
    floats = [k for k, v in plain.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert floats and all(cast[k].dtype == torch.bfloat16 and torch.equal(cast[k], plain[k].bfloat16()) for k in floats)
    others = [k for k, v in plain.items() if isinstance(v, torch.Tensor) and not v.is_floating_point()]
    assert "input_ids" in others and all(torch.equal(cast[k], plain[k]) for k in others)
