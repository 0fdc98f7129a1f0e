"""Memory estimate and out-of-memory advice: hand-computed terms, ZeRO, ranking, message."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hpc_train.train.memory_estimate import GIB, MemoryEstimate, RunShape, estimate_memory
from hpc_train.train.oom_advice import format_oom_advice, rank_oom_advice


def tiny(**changes) -> RunShape:
    """A shape small enough to compute every term by hand."""
    base = RunShape(
        params_vision=100, params_connector=10, params_llm=1000, params_head=0,
        hidden_size=8, num_layers=2, vocab_size=16,
        vision_hidden_size=4, vision_layers=3, vision_tokens_per_frame=5, lm_tokens_per_frame=2,
        mode="full", lora_params=0, freeze_vision=False, freeze_connector=False, freeze_llm=False,
        zero_stage=0, offload_optimizer=False, world_size=1,
        micro_batch=1, seq_len=10, frames_per_sample=1, param_bytes=4,
        gradient_checkpointing=False,
    )
    return replace(base, **changes)


def big_full(**changes) -> RunShape:
    """A ~7B LLM + 400M vision tower, full fine-tune in bf16 on 8 GPUs with ZeRO-2."""
    base = RunShape(
        params_vision=400_000_000, params_connector=20_000_000, params_llm=7_000_000_000,
        params_head=130_000_000, hidden_size=4096, num_layers=32, vocab_size=32_000,
        vision_hidden_size=1152, vision_layers=27, vision_tokens_per_frame=729,
        lm_tokens_per_frame=196, mode="full", lora_params=0, freeze_vision=False,
        freeze_connector=False, freeze_llm=False, zero_stage=2, offload_optimizer=False,
        world_size=8, micro_batch=1, seq_len=2048, frames_per_sample=1, param_bytes=2,
        gradient_checkpointing=True,
    )
    return replace(base, **changes)


def in_bytes(est: MemoryEstimate) -> dict[str, float]:
    return {
        "weights": est.weights_gib * GIB, "gradients": est.gradients_gib * GIB,
        "optimizer": est.optimizer_gib * GIB, "activations": est.activations_gib * GIB,
        "logits": est.logits_gib * GIB,
    }


# --- each term by hand ------------------------------------------------------------------


def test_full_fp32_single_gpu_terms_by_hand():
    got = in_bytes(estimate_memory(tiny()))
    params = 100 + 10 + 1000
    lm_acts = 2 * 34 * 8 * 10 * 4 / 2          # layers * 34h * tokens, scaled to fp32
    vision_acts = 3 * 34 * 4 * 5 * 4 / 2       # 1 frame x 5 patches
    assert got == pytest.approx({
        "weights": 4 * params, "gradients": 4 * params, "optimizer": 8 * params,
        "activations": lm_acts + vision_acts, "logits": 1 * 10 * 16 * 4 * 2,
    })
    assert estimate_memory(tiny()).total_gib * GIB == pytest.approx(sum(got.values()))


def test_bf16_mixed_precision_adam_is_12_bytes_per_param():
    got = in_bytes(estimate_memory(tiny(param_bytes=2)))
    assert got["weights"] == pytest.approx(2 * 1110)
    assert got["gradients"] == pytest.approx(2 * 1110)
    assert got["optimizer"] == pytest.approx(12 * 1110)


def test_gradient_checkpointing_keeps_layer_inputs_plus_one_layer():
    shape = tiny(frames_per_sample=0, gradient_checkpointing=True)
    lm = 2 * 2 * 8 * 4 * 10 + 34 * 8 * 10 * 4 / 2
    assert in_bytes(estimate_memory(shape))["activations"] == pytest.approx(lm)
    without = estimate_memory(replace(shape, gradient_checkpointing=False)).activations_gib
    assert estimate_memory(shape).activations_gib < without


def test_lora_trains_only_adapters_and_qlora_quantises_llm_linears():
    lora = in_bytes(estimate_memory(tiny(mode="lora", lora_params=50, param_bytes=2)))
    assert lora["weights"] == pytest.approx(2 * (1110 + 50))
    assert lora["gradients"] == pytest.approx(2 * 50)
    assert lora["optimizer"] == pytest.approx(12 * 50)
    qlora = in_bytes(estimate_memory(tiny(mode="qlora", lora_params=50, param_bytes=2)))
    embed = 16 * 8
    expected = (100 + 10) * 2 + (1000 - embed) * 0.5 * 1.03 + embed * 2 + 50 * 2
    assert qlora["weights"] == pytest.approx(expected)
    assert qlora["weights"] < lora["weights"]
    assert qlora["gradients"] == lora["gradients"]


def test_baseline_has_no_gradients_optimizer_or_backward():
    got = in_bytes(estimate_memory(tiny(mode="baseline")))
    assert got["gradients"] == got["optimizer"] == 0
    assert got["activations"] == pytest.approx(34 * 8 * 10 * 2 + 34 * 4 * 5 * 2)  # one layer each
    assert got["logits"] == pytest.approx(10 * 16 * 4)  # no gradient copy


def test_freezing_vision_removes_its_gradients_optimizer_and_backward_activations():
    free, frozen = in_bytes(estimate_memory(tiny())), in_bytes(estimate_memory(tiny(freeze_vision=True)))
    assert free["gradients"] - frozen["gradients"] == pytest.approx(4 * 100)
    assert free["optimizer"] - frozen["optimizer"] == pytest.approx(8 * 100)
    assert free["activations"] - frozen["activations"] == pytest.approx((3 - 1) * 34 * 4 * 5 * 2)
    assert frozen["weights"] == free["weights"]


# --- ZeRO ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "sharded"), [
    (0, set()), (1, {"optimizer"}), (2, {"optimizer", "gradients"}),
    (3, {"optimizer", "gradients", "weights"}),
])
def test_zero_stage_shards_the_right_terms(stage, sharded):
    one = in_bytes(estimate_memory(tiny(zero_stage=stage, world_size=1)))
    four = in_bytes(estimate_memory(tiny(zero_stage=stage, world_size=4)))
    for term in ("weights", "gradients", "optimizer", "activations", "logits"):
        expected = one[term] / 4 if term in sharded else one[term]
        assert four[term] == pytest.approx(expected), term


def test_offload_moves_optimizer_off_the_gpu():
    est = estimate_memory(tiny(zero_stage=3, world_size=4, offload_optimizer=True))
    assert est.optimizer_gib == 0
    assert est.gradients_gib > 0


# --- ranking ------------------------------------------------------------------------------


def settings(advice) -> list[str]:
    return [a.setting for a in advice]


def test_logit_dominated_run_ranks_seq_len_and_micro_batch_first():
    shape = tiny(params_llm=500_000_000, hidden_size=1024, num_layers=24, vocab_size=256_000,
                 mode="lora", lora_params=5_000_000, param_bytes=2, micro_batch=4, seq_len=8192,
                 gradient_checkpointing=True, freeze_vision=True, params_vision=90_000_000,
                 vision_hidden_size=768, vision_layers=12, vision_tokens_per_frame=1024,
                 lm_tokens_per_frame=64)
    est = estimate_memory(shape)
    assert est.logits_gib > est.total_gib / 2
    advice = rank_oom_advice(shape)
    assert set(settings(advice)[:2]) == {"data.max_seq_len=4096", "train.micro_batch_size=2"}
    assert "grad_accum" in next(
        a.why for a in advice if a.setting.startswith("train.micro_batch_size"))


def test_big_full_finetune_on_8_gpus_ranks_zero3_offload_and_qlora_high():
    advice = rank_oom_advice(big_full())
    assert set(settings(advice)[:3]) == {
        "deepspeed.config=ds_configs/zero3_offload.json", "train.mode=qlora",
        "deepspeed.config=ds_configs/zero3.json",
    }
    savings = [a.saving_gib for a in advice]
    assert savings == sorted(savings, reverse=True) and min(savings) > 0
    current = estimate_memory(big_full()).total_gib
    for a in advice:
        assert a.new_total_gib == pytest.approx(current - a.saving_gib)


def test_knobs_already_applied_are_not_suggested():
    def names(shape: RunShape) -> list[str]:
        return [s.split("=")[0] + ("=" + s.split("=")[1] if s.startswith("deep") else "")
                for s in settings(rank_oom_advice(shape))]

    base = big_full(gradient_checkpointing=False, micro_batch=2, frames_per_sample=8)
    assert "train.gradient_checkpointing" in names(base)
    assert "train.gradient_checkpointing" not in names(replace(base, gradient_checkpointing=True))
    assert "deepspeed.config=ds_configs/zero3.json" not in names(replace(base, zero_stage=3))
    assert "deepspeed.config=ds_configs/zero3_offload.json" in names(replace(base, zero_stage=3))
    assert not any(n.startswith("deepspeed") for n in
                   names(replace(base, zero_stage=3, offload_optimizer=True)))
    qlora = replace(base, mode="qlora", lora_params=40_000_000)
    assert "train.mode" not in names(qlora)
    assert "data.video.max_frames" in names(base)
    assert "data.video.max_frames" not in names(replace(base, frames_per_sample=1))
    assert "train.micro_batch_size" not in names(replace(base, micro_batch=1))
    assert "data.max_seq_len" not in names(replace(base, seq_len=512))
    assert "model.freeze" not in names(replace(base, freeze_vision=True))


def test_frames_halved_and_freeze_keeps_other_frozen_groups():
    shape = big_full(frames_per_sample=8, freeze_connector=True, mode="lora",
                     lora_params=40_000_000)
    got = settings(rank_oom_advice(shape))
    assert "data.video.max_frames=4" in got
    assert "model.freeze=[vision,connector]" in got


# --- message ------------------------------------------------------------------------------


def test_format_lists_every_setting_and_saving():
    shape = big_full(micro_batch=2, gradient_checkpointing=False)
    advice = rank_oom_advice(shape)
    text = format_oom_advice(shape, advice, error="CUDA out of memory. Tried to allocate 2 GiB")
    assert "CUDA out of memory" in text
    assert f"{estimate_memory(shape).total_gib:.1f} GiB" in text
    for a in advice:
        assert a.setting in text
        assert f"{a.saving_gib:.1f} GiB" in text


def test_format_names_first_knob_that_fits():
    shape = big_full()
    advice = rank_oom_advice(shape)
    # Between the 2nd and 1st best totals: only the top knob fits.
    available = (advice[0].new_total_gib + advice[1].new_total_gib) / 2
    text = format_oom_advice(shape, advice, available_gib=available)
    assert f"one change: {advice[0].setting}" in text
    available = (advice[1].new_total_gib + advice[2].new_total_gib) / 2
    text = format_oom_advice(shape, advice, available_gib=available)
    assert f"one change: {advice[0].setting}" in text  # the largest saving is named first
    text = format_oom_advice(shape, advice, available_gib=advice[0].new_total_gib - 0.5)
    assert "one change" not in text and "No single change" in text


def test_invalid_shape_is_refused():
    with pytest.raises(ValueError, match="mode"):
        tiny(mode="fulll")
    with pytest.raises(ValueError, match="zero_stage"):
        tiny(zero_stage=4)
