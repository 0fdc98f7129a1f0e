"""``hpc-train plan``'s parts, each against the real thing it predicts: a fake micro-step against
the same step on the real model, DeepSpeed's state rules against real engines, 4-bit storage
against bitsandbytes, and a whole plan against a real training run (live tensor bytes counted
by profiling/live_tensors.py, which shares nothing with the planner)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hpc_train.config_file import load_config
from hpc_train.data.batching.collate import step_inputs
from hpc_train.data.pipeline import build_pipeline
from hpc_train.data.sources.mixture import read_split
from hpc_train.errors import ConfigError
from hpc_train.models.attention import use_varlen_attention
from hpc_train.models.image_tokens import image_tokens_always_match, mark_image_tokens_checked
from hpc_train.models.load import model_family
from hpc_train.models.tiny import build_tiny
from hpc_train.models.varlen_backend import PER_SAMPLE
from hpc_train.plan.fake_step import step_memory
from hpc_train.plan.gpus import GPUS, gpu_named
from hpc_train.plan.params import _nf4
from hpc_train.plan.planner import Planner, largest_that_fits
from hpc_train.plan.states import Param, deepspeed_states
from hpc_train.train.loss import loss_for
from hpc_train.train.trainable_model import prepare_for_training
from profiling.live_tensors import LiveTensorBytes
from tests.conftest import FAMILIES
from tests.conftest import TINY_RECIPES as RECIPES


def test_live_tensor_bytes_counts_each_storage_once_until_it_is_freed():
    live = LiveTensorBytes()
    with live:
        a = torch.zeros(1000)  # 4,000 bytes
        view = a[10:]  # the same storage
        b = a * 2
        assert live.current == 8000
        del a, b
        assert live.current == 4000  # the view keeps a's storage
        del view
        assert live.current == 0
    assert live.peak == 8000


def config_for(family: str, synthetic_data: Path, *extra: str):
    return load_config(RECIPES[family], [f"data.train={synthetic_data / 'train.jsonl'}", "data.eval=null",
                                         "model.dtype=fp32", "train.device=cpu", *extra])


def real_step_bytes(config, family_name: str, batch: dict) -> int:
    """Peak live bytes of one real micro-step above the weights, gradients handed off as DeepSpeed does."""
    model, processor = build_tiny(family_name)
    model = prepare_for_training(model, config, model_family(config.model))
    use_varlen_attention(model, PER_SAMPLE)
    if image_tokens_always_match(model.config, processor, family_name):
        mark_image_tokens_checked(model)
    model.train()
    for param in model.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    live = LiveTensorBytes()
    live.adopt([*model.parameters(), *model.buffers()])
    weights = live.current
    with live:
        loss = loss_for(config.data, config.train, zero=2)(model, step_inputs(batch))
        loss.value.backward()
    return live.peak - weights


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,checkpointing,packing,tiles", [
    ("full", False, False, False), ("lora", True, False, False), ("full", True, True, False),
    ("lora", False, True, False), ("full", False, False, True)])  # tiles: the head in tiles of 4 positions
def test_a_fake_step_keeps_the_bytes_the_real_step_keeps(synthetic_data, family, mode, checkpointing, packing, tiles):
    config = config_for(family, synthetic_data, f"train.mode={mode}",
                        f"train.gradient_checkpointing={str(checkpointing).lower()}",
                        f"data.packing={str(packing).lower()}", "train.micro_batch_size=2" if packing else
                        "train.micro_batch_size=6", "data.max_seq_len=256",
                        *(["train.logits_tile_mib=0.01"] if tiles else []))
    planner = Planner(config, 1, bf16=False, on_gpu=False)
    pipeline = build_pipeline(config.data, planner.processor, planner.family)
    records = read_split(config, "train")
    dataset = pipeline.dataset(records)
    samples = [dataset[i] for i in range(10)]
    batch = (pipeline.packed_collator(rows_per_micro=2) if packing else pipeline.collator())(samples)
    predicted = step_memory(config, planner.family, planner.model, batch, zero=2).step_bytes
    measured = real_step_bytes(config, family, batch)
    assert abs(predicted / measured - 1) < 0.01, (predicted, measured)


def test_nf4_storage_is_what_bitsandbytes_keeps():
    bnb = pytest.importorskip("bitsandbytes")
    for double in (True, False):
        weight = bnb.nn.Params4bit(torch.randn(384, 256), requires_grad=False, quant_type="nf4",
                                   compress_statistics=double)._quantize("cpu")
        state = weight.quant_state
        constants = state.absmax.nbytes + state.code.nbytes
        if double:
            constants += state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
        planned = _nf4(384 * 256, 4, zero_stage=2, double_quant=double)
        assert planned.numel * planned.element_size == weight.data.nbytes
        assert planned.constants == constants


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_holds_what_the_state_rules_say(world_of_one, stage):
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64))
    model[0].requires_grad_(False)
    bucket = 300_000
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_bucket_size": bucket, "stage3_param_persistence_threshold": 100}}
    trainable = [Param(p.numel(), 4, True) for p in model.parameters() if p.requires_grad]
    frozen = [Param(p.numel(), 4, False) for p in model.parameters() if not p.requires_grad]
    states = deepspeed_states([trainable], frozen, ds, 1, element_size=4, on_gpu=False)
    live = LiveTensorBytes()
    live.adopt([*model.parameters(), *model.buffers()])
    with live:
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad]), config=ds)
        held = live.current
        for _ in range(2):
            live.mark()
            engine.backward(engine(torch.randn(4, 256)).square().mean())
            engine.step()
        after = live.current
    # Exact but for scalars (Adam's step counter, DeepSpeed's overflow flag): a few bytes. ZeRO-3's
    # persistent parameters are whole by the first step's end (sometimes already after initialize).
    assert states.resident - states.persistent - 16 <= held <= states.resident + 16, (held, states.resident)
    expected = states.resident + states.optimizer
    assert abs(after - expected) <= 16, (after, expected)


def test_with_accumulation_zero2s_gradient_store_outlives_the_micro_batch(world_of_one):
    import deepspeed

    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64))
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_bucket_size": 300_000}}
    states = deepspeed_states([[Param(p.numel(), 4, True) for p in model.parameters()]], [], ds, 1,
                              element_size=4, on_gpu=False)
    live = LiveTensorBytes()
    live.adopt(list(model.parameters()))
    with live:
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
        engine.backward(engine(torch.randn(4, 256)).square().mean())  # the first micro-batch: no step
        engine.step()
        held = live.current
    assert states.early_store
    assert abs(held - (states.resident + states.gradients)) <= 16, (held, states.resident, states.gradients)


def test_an_unknown_gpu_lists_the_known_ones():
    with pytest.raises(ConfigError) as raised:
        gpu_named("RTX-9090")
    assert all(name in str(raised.value) for name in GPUS)
    assert gpu_named("h100").name == "H100-80GB" and gpu_named("a100_40gb").name == "A100-40GB"


def test_every_known_gpu_has_a_datasheet_peak():
    assert all(gpu.peak_tflops("bf16") for gpu in GPUS.values())


def test_largest_that_fits_finds_the_edge_of_a_monotone_test():
    asked = []

    def fit(n: int) -> bool:
        asked.append(n)
        return n <= 37

    assert largest_that_fits(1, 100, fit) == 37 and len(asked) <= 9
    assert largest_that_fits(40, 100, fit) is None
