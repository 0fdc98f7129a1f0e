"""Packing is exact: each sample in a packed row gets the logits, loss and gradients it gets alone."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from hpc_train.config import DataConfig
from hpc_train.data.batching.collate import Collator, model_inputs
from hpc_train.data.batching.packing import pack_samples, plan_packs, rank_rows
from hpc_train.data.dataset import MediaLoader
from hpc_train.data.encoding.loss_positions import loss_positions
from hpc_train.data.encoding.tokenize import IGNORE_INDEX, ChatEncoder
from hpc_train.data.sources.records import read_records
from hpc_train.errors import DataError
from hpc_train.models.attention import (
    VARLEN,
    uses_varlen_attention,
    varlen_attention,
)
from hpc_train.models.families import get_family
from tests.conftest import FAMILIES, mixed_samples


@pytest.fixture(scope="module", params=FAMILIES)
def packed_case(request, loaded_tiny, varlen_tiny, synthetic_data):
    family = request.param
    model = varlen_tiny[family]
    assert uses_varlen_attention(model)
    return family, model, loaded_tiny[family][1], mixed_samples(loaded_tiny, synthetic_data, family)


def grad_of(param: torch.nn.Parameter) -> torch.Tensor:
    return param.grad.clone() if param.grad is not None else torch.zeros_like(param)


def packed_inputs(batch):
    return {k: v for k, v in batch.items() if k != "sample_ids"}


def test_packed_logits_equal_separate_logits(packed_case):
    family, model, processor, samples = packed_case
    batch = pack_samples(samples, pad_token_id=processor.tokenizer.pad_token_id, family_name=family)
    collate = Collator(get_family(family), processor.tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(**packed_inputs(batch), use_cache=False).logits[0]
        start = 0
        for s in samples:
            alone = model(**model_inputs(collate([s])), use_cache=False).logits[0]
            diff = (packed[start:start + len(s)] - alone).abs().max().item()
            assert diff <= 1e-5, (s.id, diff)
            start += len(s)


def test_no_mask_is_built_for_a_packed_row_and_a_padded_batch_keeps_its_own(packed_case):
    from transformers import AttentionInterface

    family, model, processor, samples = packed_case
    seen: list[tuple[bool, object]] = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((kwargs.get("cu_seq_lens_q") is not None, attention_mask))
        return varlen_attention(module, query, key, value, attention_mask, **kwargs)

    pad = processor.tokenizer.pad_token_id
    AttentionInterface.register(VARLEN, recording)
    try:
        with torch.no_grad():
            model(**packed_inputs(pack_samples(samples, pad_token_id=pad, family_name=family)), use_cache=False)
            packed = list(seen)
            seen.clear()
            model(**model_inputs(Collator(get_family(family), pad)(samples[:3])), use_cache=False)
    finally:
        AttentionInterface.register(VARLEN, varlen_attention)
    assert packed and all(has_bounds and mask is None for has_bounds, mask in packed)
    assert seen and all(not has_bounds and mask is not None for has_bounds, mask in seen)


def test_pack_loss_and_gradients_equal_token_weighted_separate(packed_case):
    family, model, processor, samples = packed_case
    collate = Collator(get_family(family), processor.tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    total_tokens = sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples)
    separate = 0.0
    for s in samples:
        loss = model(**model_inputs(collate([s])), use_cache=False).loss
        n = int((s.labels[1:] != IGNORE_INDEX).sum())
        (loss * n / total_tokens).backward()
        separate += float(loss.detach()) * n / total_tokens
    expected = [grad_of(p) for p in params]
    model.zero_grad()
    batch = pack_samples(samples, pad_token_id=processor.tokenizer.pad_token_id, family_name=family)
    loss = model(**packed_inputs(batch), use_cache=False).loss
    loss.backward()
    assert float(loss) == pytest.approx(separate, rel=1e-5)
    worst = max((grad_of(p) - e).abs().max().item() for p, e in zip(params, expected, strict=True))
    assert worst <= 1e-5


def test_packed_row_layout(packed_case):
    family, _, processor, samples = packed_case
    batch = pack_samples(samples, pad_token_id=processor.tokenizer.pad_token_id, family_name=family, pad_to=400)
    lengths = [len(s) for s in samples]
    cu = batch["cu_seq_lens_q"].tolist()
    assert cu[: len(samples) + 1] == [0, *torch.tensor(lengths).cumsum(0).tolist()] and cu[-1] == 400
    starts = cu[:-1]
    assert all(batch["position_ids"][0, s] == 0 for s in starts)
    # No sample is trained to predict the next sample's first token.
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert "attention_mask" not in batch  # an all-ones mask would defeat packed-sequence handling


def test_plan_best_fit_decreasing_is_deterministic_and_tight():
    lengths = [30, 70, 50, 50, 20, 80, 10, 90, 40, 60] * 10
    a = plan_packs(lengths, 100, seed=0, epoch=0)
    b = plan_packs(lengths, 100, seed=0, epoch=0)
    c = plan_packs(lengths, 100, seed=0, epoch=1)
    assert a.rows == b.rows and a.rows != c.rows
    assert sorted(i for row in a.rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in a.rows)
    assert a.efficiency == 1.0  # these lengths pair up exactly into full rows


def test_plan_rejects_a_sample_longer_than_a_row():
    with pytest.raises(DataError, match="sample 1 is 130 tokens, longer than data.max_seq_len=100"):
        plan_packs([10, 130], 100, seed=0, epoch=0)


def test_rank_rows_equal_whole_steps():
    plan = plan_packs([10] * 95, 40, seed=0, epoch=0)  # 24 rows
    shares = [rank_rows(plan, rank=r, world_size=3, rows_per_step=2) for r in range(3)]
    assert {len(s) for s in shares} == {8}
    flat = [tuple(row) for s in shares for row in s]
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize("family", FAMILIES)
def test_lengths_without_pixels_equal_encoded_lengths(loaded_tiny, synthetic_data, family, tmp_path):
    from hpc_train.data.encoding.lengths import sample_lengths

    cfg = DataConfig(video={"num_frames": 4})
    records = read_records(synthetic_data / "train.jsonl", media_root=cfg.media_root)
    encoder = ChatEncoder(loaded_tiny[family][1], get_family(family))
    estimated = sample_lengths(records, encoder, cfg, cache_dir=tmp_path, source=synthetic_data / "train.jsonl")
    actual = [len(encoder.encode(r, MediaLoader(cfg).load(r))) for r in records]
    assert estimated == actual
    assert len(list(tmp_path.glob("*.json"))) == 1  # cached
    again = sample_lengths(records, encoder, cfg, cache_dir=tmp_path, source=synthetic_data / "train.jsonl")
    assert again == estimated
    other = DataConfig(video={"num_frames": 2})
    sample_lengths(records, encoder, other, cache_dir=tmp_path, source=synthetic_data / "train.jsonl")
    assert len(list(tmp_path.glob("*.json"))) == 2  # a setting that changes lengths gets its own cache


@pytest.mark.parametrize("world", [2, 3])
def test_shapes_measured_in_shares_by_the_ranks_equal_the_whole_measurement(loaded_tiny, synthetic_data, world):
    from hpc_train.data.encoding.lengths import interleaved, measure_shapes, sample_shapes

    cfg = DataConfig(video={"num_frames": 4})
    records = read_records(synthetic_data / "train.jsonl", media_root=cfg.media_root)
    encoder = ChatEncoder(loaded_tiny["llava_onevision"][1], get_family("llava_onevision"))
    told = []
    shares = [measure_shapes(records, encoder, cfg, range(rank, len(records), world), progress=told.append)
              for rank in range(world)]
    assert interleaved(shares) == sample_shapes(records, encoder, cfg)
    assert any(frames for frames in interleaved(shares).video_frames) and not told  # fewer than 10,000


@pytest.mark.parametrize(("world", "rows", "accum"), [(1, 1, 1), (2, 1, 2), (3, 2, 1)])
def test_planned_packs_give_the_planned_steps_every_epoch(world, rows, accum):
    from hpc_train.data.batching.packing import PlannedPacks

    lengths = [(7 * i) % 90 + 10 for i in range(300)] + [-1, -1]  # two unusable samples
    packs = [PlannedPacks(lengths, 128, seed=3, rank=r, world_size=world, rows_per_micro=rows, grad_accum=accum)
             for r in range(world)]
    steps = packs[0].steps_per_epoch()
    assert steps > 0
    for epoch in range(3):
        per_rank = [p.micro_batches(epoch) for p in packs]
        assert {len(m) for m in per_rank} == {steps * accum}
        seen = [i for m in per_rank for batch in m for i in batch]
        assert len(seen) == len(set(seen)) and not {300, 301} & set(seen)
        assert all(sum(lengths[i] for i in batch) <= 128 * rows for m in per_rank for batch in m)


def test_packed_row_immune_to_use_cache_and_refuses_a_filled_cache(packed_case):
    """transformers skips packed-sequence detection when a cache exists; our boundaries come
    from cu_seqlens, so use_cache=True changes nothing, and a non-empty cache is refused."""
    from types import SimpleNamespace

    from hpc_train.models.attention import varlen_attention

    family, model, processor, samples = packed_case
    batch = pack_samples(samples[:3], pad_token_id=processor.tokenizer.pad_token_id, family_name=family)
    with torch.no_grad():
        cached = model(**packed_inputs(batch), use_cache=True).logits
        plain = model(**packed_inputs(batch), use_cache=False).logits
    assert (cached - plain).abs().max().item() <= 1e-6
    q, kv = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="use_cache=False"):
        varlen_attention(SimpleNamespace(training=False), q, kv, kv, None, cu_seq_lens_q=cu,
                         cu_seq_lens_k=cu, max_length_q=2, max_length_k=2)


def test_varlen_attention_equals_block_diagonal_sdpa():
    from types import SimpleNamespace

    from hpc_train.models.attention import varlen_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    cu = torch.tensor([0, 3, 7, 10], dtype=torch.int32)
    out, _ = varlen_attention(SimpleNamespace(training=False), q, k, v, None, cu_seq_lens_q=cu,
                              cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    allowed = torch.zeros(10, 10, dtype=torch.bool)
    for a, b in ((0, 3), (3, 7), (7, 10)):
        allowed[a:b, a:b] = torch.ones(b - a, b - a).tril().bool()
    reference = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed)
    assert torch.allclose(out, reference.transpose(1, 2), atol=1e-6)


def test_per_sample_mean_loss_option(packed_case):
    from hpc_train.train.loss import sample_mean_loss

    family, model, processor, samples = packed_case
    # Give the first sample a single supervised token, so samples weigh differently per token.
    first = copy.copy(samples[0])
    first.labels = first.labels.clone()
    first.labels[(first.labels != IGNORE_INDEX).nonzero()[-1]] = IGNORE_INDEX
    samples = [first, *samples[1:]]
    collate = Collator(get_family(family), processor.tokenizer.pad_token_id)
    with torch.no_grad():
        separate = [float(model(**model_inputs(collate([s])), use_cache=False).loss) for s in samples]
        batch = pack_samples(samples, pad_token_id=processor.tokenizer.pad_token_id, family_name=family, pad_to=500)
        inputs = {**packed_inputs(batch), **loss_positions(batch["labels"])}
        loss = sample_mean_loss(model, inputs).value
    assert float(loss) == pytest.approx(sum(separate) / len(separate), rel=1e-5)
    token_mean = model(**packed_inputs(batch), use_cache=False).loss
    assert abs(float(token_mean) - float(loss)) > 1e-4  # the two options really differ here


def test_smolvlm2_lengths_carry_the_frames_times(loaded_tiny, tmp_path):
    """SmolVLM2 writes each frame's time and the video's duration into its prompt, whose digits
    tokenize to different lengths: the stand-ins take the container's frame times."""
    import av

    from hpc_train.data.encoding.lengths import sample_lengths, stand_in_media

    with av.open(str(tmp_path / "long.mp4"), "w") as container:  # 95 s at 1 fps
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(95):
            frame = np.full((32, 32, 3), (i * 9) % 255, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    lines = [{"id": f"v{k}", "video": "long.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat changes?"}, {"from": "gpt", "value": "the grey"}]} for k in range(2)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = read_records(tmp_path / "long.jsonl")
    cfg = DataConfig(video={"sampling": "fps", "fps": 0.1, "max_frames": 32})
    encoder = ChatEncoder(loaded_tiny["smolvlm2"][1], get_family("smolvlm2"))
    decoded = MediaLoader(cfg).load(records[0])
    assert np.array_equal(stand_in_media(records[0], cfg).videos[0].timestamps, decoded.videos[0].timestamps)
    assert decoded.videos[0].timestamps[-1] >= 90  # "Frame from 01:30:"
    actual = [len(encoder.encode(r, MediaLoader(cfg).load(r))) for r in records]
    assert sample_lengths(records, encoder, cfg) == actual
