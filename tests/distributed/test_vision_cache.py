"""Real 2-rank DeepSpeed runs with ``data.vision_cache``: the cold run, and the run with the cache
warm, train with the losses of the run without it; under ZeRO-3 a rank whose batch is all
cached still meets the other in the tower's gathers (no hang)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc_train.train.metrics import read_metrics
from profiling.report import read_report
from profiling.show import show

from .conftest import ok, run_hpc_train
from .test_sequence_parallel import assert_same_training, train


def media_file(synthetic_data: Path, out: Path) -> Path:
    """16 records of every media kind, two text-only (two steps per epoch on 2 ranks of 4)."""
    records = [json.loads(line) for line in (synthetic_data / "train.jsonl").read_text().splitlines()]
    picked = [r for r in records if r["kind"] != "text"][:14] + [r for r in records if r["kind"] == "text"][:2]
    out.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return out


def steps(out: Path) -> list[dict]:
    return [row for row in read_metrics(out / "metrics.jsonl") if "loss" in row]


def run(train_args, family: str, out: Path, data: Path, synthetic_data: Path, *extra: str) -> list[dict]:
    ok(run_hpc_train("train", *train_args(family, out, f"data.train={data}", f"data.media_root={synthetic_data}",
                                          "data.eval=null", "train.epochs=2", "train.mode=lora", "lora.target=llm",
                                          "lora.dropout=0", "eval.generate=false", *extra), timeout=400))
    return steps(out)


def test_cache_vision_on_two_ranks_then_a_warm_zero2_run_trains_as_without_it(tmp_path, synthetic_data,
                                                                               tiny_model_dirs, train_args):
    """``cache-vision`` fills the cache on 2 ranks (then finds it full on 1); the 2-rank run after it
    has the losses and every LoRA gradient of each step of the run without the cache, and its ranks
    decode no video frame and encode no tile."""
    data = media_file(synthetic_data, tmp_path / "media.jsonl")
    cache = tmp_path / "cache"
    common = (f"data.media_root={synthetic_data}", "train.epochs=2", "train.mode=lora", "lora.target=llm",
              "train.micro_batch_size=4")
    plain = train(tmp_path / "plain", "smolvlm2", tiny_model_dirs["smolvlm2"], data, *common, nproc=2)
    args = train_args("smolvlm2", tmp_path / "fill", f"data.train={data}", *common, "data.eval=null",
                      f"data.vision_cache={cache}")
    filled = ok(run_hpc_train("cache-vision", *args, nproc=2))
    assert "14 training samples with media: 14 computed and stored, 0 already cached (hit rate 0%)" in filled.stdout
    assert len(list(cache.rglob("*.safetensors"))) == 14
    again = ok(run_hpc_train("cache-vision", *args, nproc=1))
    assert "0 computed and stored, 14 already cached (hit rate 100%)" in again.stdout

    warm = train(tmp_path / "warm", "smolvlm2", tiny_model_dirs["smolvlm2"], data, *common,
                 f"data.vision_cache={cache}", nproc=2)
    assert len(plain["metrics"]) == 4
    assert_same_training(warm, plain)
    assert [s["loss"] for s in warm["metrics"]] == pytest.approx([s["loss"] for s in plain["metrics"]], rel=1e-6)
    assert [s["vision_computed_samples"] for s in warm["metrics"]] == [0] * 4
    assert sum(s["vision_cached_samples"] for s in warm["metrics"]) == 28
    assert warm["encoded"] == (0, 0) and warm["decoded"] == (0, 0) and min(plain["decoded"]) > 0


def test_zero3_packed_mixed_cache_does_not_hang_and_trains_as_without_it(tmp_path, synthetic_data, train_args):
    data = media_file(synthetic_data, tmp_path / "media.jsonl")
    cache = tmp_path / "cache"
    extra = ("deepspeed.config=ds_configs/zero3.json", "data.packing=true", "data.max_seq_len=768",
             "train.micro_batch_size=1", "data.video.num_frames=4")
    plain = run(train_args, "llava_onevision", tmp_path / "plain", data, synthetic_data, *extra)
    run(train_args, "llava_onevision", tmp_path / "cold", data, synthetic_data, *extra, f"data.vision_cache={cache}")
    entries = sorted(cache.rglob("*.safetensors"))
    for entry in entries[::2]:  # some rows all cached on a rank, others not
        entry.unlink()
    mixed = run(train_args, "llava_onevision", tmp_path / "mixed", data, synthetic_data, *extra,
                f"data.vision_cache={cache}")
    assert [s["loss"] for s in mixed] == pytest.approx([s["loss"] for s in plain], rel=1e-5)
    cached, computed = (int(sum(s[k] for s in mixed)) for k in ("vision_cached_samples", "vision_computed_samples"))
    assert cached and computed
    report = read_report(tmp_path / "mixed" / "profile" / "report.json")  # both ranks' counts, merged
    assert (report["vision_cache"]["samples_cached"], report["vision_cache"]["samples_computed"]) == (cached, computed)
    assert report["vision_cache"]["hit_rate"] == pytest.approx(cached / (cached + computed))
    assert report["vision_cache"]["bytes_read"] > 0 and f"{cached} samples cached, {computed} computed" in show(report)


def test_cache_vision_refuses_a_run_that_trains_the_tower(tmp_path, synthetic_data, train_args):
    args = train_args("smolvlm", tmp_path / "run", "train.mode=lora", "lora.target=all",
                      f"data.vision_cache={tmp_path / 'cache'}")
    refused = run_hpc_train("cache-vision", *args, nproc=1)
    assert refused.returncode != 0
    assert "data.vision_cache is off for this run: the vision (LoRA)" in refused.stderr
    assert not (tmp_path / "cache").exists()
