"""What the host decides so the device is not read every forward: masks dropped where nothing
is masked (exact), the attention names swapped for one forward only, SmolVLM's image tokens
checked once, PyTorch's varlen kernel called with the layout it takes."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from hpc_train.data.batching.collate import Collator, model_inputs
from hpc_train.errors import HpcTrainError
from hpc_train.models.attention import VARLEN, attention_with
from hpc_train.models.families import get_family
from hpc_train.models.host_masks import (
    PADDED_SUFFIX,
    UNMASKED_SUFFIX,
    VISION_UNMASKED,
    masks_decided_on_host,
)
from hpc_train.models.image_tokens import (
    image_check_made,
    image_tokens_always_match,
    mark_image_tokens_checked,
)
from hpc_train.models.varlen_backend import TORCH_VARLEN
from tests.conftest import mixed_samples


@pytest.fixture(scope="module")
def smolvlm(loaded_tiny, varlen_tiny, synthetic_data):
    return varlen_tiny["smolvlm"], loaded_tiny["smolvlm"][1], mixed_samples(loaded_tiny, synthetic_data, "smolvlm")


def test_a_batch_without_padding_has_no_masks_and_the_same_logits(smolvlm):
    model, processor, samples = smolvlm
    same_length = [s for s in samples if len(s) == len(samples[1])][:1] * 2
    batch = Collator(get_family("smolvlm"), processor.tokenizer.pad_token_id)(same_length)
    assert "attention_mask" not in batch and "pixel_attention_mask" not in batch
    masked = {**model_inputs(batch), "attention_mask": torch.ones_like(batch["input_ids"]),
              "pixel_attention_mask": torch.ones(batch["pixel_values"].shape[:2] + batch["pixel_values"].shape[-2:],
                                                 dtype=torch.bool)}
    with torch.no_grad():
        with masks_decided_on_host(model, model_inputs(batch)):
            free = model(**model_inputs(batch), use_cache=False).logits
        reference = model(**masked, use_cache=False).logits
    assert torch.equal(free, reference)


def test_generation_batches_keep_their_mask():
    from hpc_train.data.encoding.tokenize import EncodedSample

    sample = EncodedSample(id="a", input_ids=torch.arange(4), labels=torch.arange(4), media={},
                           num_media_tokens=0, answers=[])
    left = Collator(get_family("smolvlm"), 0, padding_side="left")([sample, sample])
    assert left["attention_mask"].all()  # generate() needs it to know there is no padding


def test_the_names_the_host_chose_last_one_forward(smolvlm):
    model, _, _ = smolvlm
    text, vision = model.config.text_config, model.config.vision_config
    seen = []
    with masks_decided_on_host(model, {"input_ids": None}):
        seen.append((text._attn_implementation, vision._attn_implementation))
    with masks_decided_on_host(model, {"attention_mask": 1, "pixel_attention_mask": 1}):
        seen.append((text._attn_implementation, vision._attn_implementation))
    assert seen == [(VARLEN + UNMASKED_SUFFIX, VISION_UNMASKED), (VARLEN + PADDED_SUFFIX, "sdpa")]
    assert (text._attn_implementation, vision._attn_implementation) == (VARLEN, "sdpa")
    with pytest.raises(RuntimeError), masks_decided_on_host(model, {"input_ids": None}):
        raise RuntimeError("a forward that fails")
    assert text._attn_implementation == VARLEN  # restored all the same


def test_a_padded_batch_gets_the_same_logits_as_under_transformers_own_mask(smolvlm):
    model, processor, samples = smolvlm
    batch = Collator(get_family("smolvlm"), processor.tokenizer.pad_token_id)(samples[:3])
    assert not batch["attention_mask"].all()  # samples of different lengths: padded
    with torch.no_grad():
        with masks_decided_on_host(model, model_inputs(batch)):
            decided = model(**model_inputs(batch), use_cache=False).logits
        reference = model(**model_inputs(batch), use_cache=False).logits
    assert torch.equal(decided, reference)


def test_a_local_window_keeps_its_mask():
    from transformers.masking_utils import sdpa_mask

    from hpc_train.models.host_masks import mask_unless_causal_is_exact

    windowed = mask_unless_causal_is_exact(1, 8, 8, local_size=3, mask_function=_sliding(3))
    assert windowed is not None and torch.equal(windowed, sdpa_mask(1, 8, 8, local_size=3, mask_function=_sliding(3),
                                                                    allow_is_causal_skip=False))
    assert mask_unless_causal_is_exact(1, 8, 8) is None


def _sliding(window: int):
    from transformers.masking_utils import sliding_window_causal_mask_function

    return sliding_window_causal_mask_function(window)


def test_smolvlm_image_tokens_are_checked_once_against_the_model(smolvlm):
    model, processor, _ = smolvlm
    assert image_tokens_always_match(model.config, processor, "smolvlm")
    assert not image_tokens_always_match(model.config, processor, "llava_onevision")  # its check stays per forward
    wrong = copy.copy(processor)
    wrong.image_seq_len = processor.image_seq_len + 1
    with pytest.raises(HpcTrainError, match=f"writes {wrong.image_seq_len} image tokens per .*Fix: load the processor"):
        image_tokens_always_match(model.config, wrong, "smolvlm")


def test_smolvlm2_video_frames_are_checked_against_the_model_s_tile_too(loaded_tiny):
    model, processor = loaded_tiny["smolvlm2"]
    assert image_tokens_always_match(model.config, processor, "smolvlm2")
    wrong = copy.deepcopy(processor)
    wrong.video_processor.max_image_size = {"longest_edge": 32}
    with pytest.raises(HpcTrainError, match="resizes video frames to 32-pixel tiles.*4 features per 64-pixel tile.*Fix: load the processor"):
        image_tokens_always_match(model.config, wrong, "smolvlm2")


def test_the_per_forward_image_check_is_off_only_inside_a_marked_models_forward(smolvlm):
    model, _, _ = smolvlm
    marked = copy.copy(model)
    mark_image_tokens_checked(marked)
    with image_check_made(model):
        assert "TRANSFORMERS_DISABLE_TORCH_CHECK" not in os.environ
    with image_check_made(marked):
        assert os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] == "1"
    assert "TRANSFORMERS_DISABLE_TORCH_CHECK" not in os.environ


def test_pytorchs_varlen_kernel_is_called_with_the_layout_it_takes(monkeypatch):
    """On fake CUDA tensors (no GPU here) the real ``varlen_attn`` runs its shape checks and
    fake kernel; the arguments it got are recorded on the way in. Its numbers wait for a GPU
    (``benchmarks/gpu_check.sh``: ``varlen-exactness``)."""
    import torch.nn.attention.varlen as varlen
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hpc_train.models.attention import KERNELS

    real, calls = varlen.varlen_attn, []

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", recorded)
    attention = attention_with(KERNELS[TORCH_VARLEN])
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, 4, 10, 8, dtype=torch.bfloat16, device="cuda")
        kv = torch.empty(1, 2, 10, 8, dtype=torch.bfloat16, device="cuda")
        cu = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
        out, _ = attention(torch.nn.Module().eval(), q, kv, kv, None, scaling=0.3, cu_seq_lens_q=cu,
                           cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
        with pytest.raises(ValueError, match="no dropout"):
            attention(torch.nn.Module().train(), q, kv, kv, None, dropout=0.1, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=6, max_length_k=6)
    assert out.shape == (1, 10, 4, 8) and out.dtype == torch.bfloat16  # (batch, seq, heads, dim) for transformers
    (args, kwargs), = calls
    query, key, value, cu_q, cu_k, max_q, max_k = args
    assert query.shape == (10, 4, 8) and key.shape == value.shape == (10, 2, 8)  # (tokens, heads, dim)
    assert query.stride(-1) == 1 and cu_q is cu and cu_k is cu and (max_q, max_k) == (6, 6)
    assert kwargs == {"scale": 0.3, "window_size": (-1, 0), "enable_gqa": True}  # causal, grouped heads


def test_media_metadata_the_model_reads_on_the_host_stays_there(loaded_tiny, synthetic_data):
    from hpc_train.train.evaluate import to_device

    samples = mixed_samples(loaded_tiny, synthetic_data, "llava_onevision")
    batch = model_inputs(Collator(get_family("llava_onevision"), 0)(samples))
    moved = to_device(batch, torch.device("meta"), torch.bfloat16)  # any device but the CPU
    assert moved["image_sizes"].device.type == moved["batch_num_images"].device.type == "cpu"
    assert moved["input_ids"].is_meta and moved["pixel_values"].is_meta
    assert moved["pixel_values"].dtype == torch.bfloat16
