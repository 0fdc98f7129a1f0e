"""Real DeepSpeed training on 2 CPU processes (gloo), for both families and every mode."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpc_train.train.metrics import read_metrics
from hpc_train.train.trainer import REQUEUE_EXIT_CODE
from profiling.report import read_report

from .conftest import (
    FAMILIES,
    hpc_train_cmd,
    logged_steps,
    ok,
    run_hpc_train,
    start_until,
)


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out / "metrics.jsonl") if "loss" in row]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved model's weights under the model's own parameter names (as loaded)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_single_process_exits_with_requeue_status_on_sigterm(tmp_path, train_args):
    out = tmp_path / "single"
    args = train_args("smolvlm", out, "train.max_steps=200", "eval.generate=false")
    proc = start_until(hpc_train_cmd("train", *args, nproc=1), logged_steps(out, 1))
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    assert "signal SIGTERM: checkpoint" in output
    assert (out / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_zero2_trains_and_learns(zero2_runs, tiny_model_dirs, family):
    out = zero2_runs[family]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert rows[-1]["samples"] == 8  # micro-batch 4 x 2 ranks, every sample counted once
    assert losses(out)[-1] < losses(out)[0]
    trained, base = weights(out / "model"), weights(tiny_model_dirs[family])
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    result = json.loads((out / "eval_results.json").read_text())
    assert result["samples"] == 8 and result["generated"] == 8 and result["loss"] > 0
    assert len(result["records"]) == result["generation"]["records"] == 8  # both ranks' answers
    evaluation = read_report(out / "profile" / "report.json")["evaluation"]
    assert evaluation["metrics"] == result["metrics"] and evaluation["generation"] == result["generation"]


@pytest.mark.parametrize("family", FAMILIES)
def test_zero3_matches_zero2(zero2_runs, tmp_path, train_args, family):
    out = tmp_path / "z3"
    ok(run_hpc_train("train", *train_args(family, out, "train.max_steps=4", "train.mode=full",
                                          "deepspeed.config=ds_configs/zero3.json")))
    assert losses(out) == pytest.approx(losses(zero2_runs[family]), rel=1e-4)
    z2, z3 = weights(zero2_runs[family] / "model"), weights(out / "model")
    assert max((z2[k] - z3[k]).abs().max().item() for k in z2) < 1e-4


def test_freezing_leaves_frozen_weights_bit_identical(tmp_path, tiny_model_dirs, train_args):
    out = tmp_path / "frozen"
    ok(run_hpc_train("train", *train_args("smolvlm", out, "train.max_steps=2", "train.mode=full",
                                          "model.freeze=[vision,connector]")))
    trained, base = weights(out / "model"), weights(tiny_model_dirs["smolvlm"])
    frozen = [k for k in base if k.startswith(("model.vision_model.", "model.connector."))]
    assert frozen and all(torch.equal(trained[k], base[k]) for k in frozen)
    moved = [k for k in base if k.startswith("model.text_model.") and not torch.equal(trained[k], base[k])]
    assert moved


def test_per_group_learning_rates_are_the_ones_applied(tmp_path, tiny_model_dirs, train_args):
    out = tmp_path / "rates"
    rates = {"vision": 1e-3, "connector": 3e-3, "llm": 1e-4, "head": 3e-4}
    ok(run_hpc_train("train", *train_args(
        "smolvlm", out, "train.max_steps=1", "train.mode=full", "train.grad_clip=null",
        "train.lr_groups={vision: 1e-3, connector: 3e-3, llm: 1e-4, head: 3e-4}", "eval.generate=false")))
    row = read_metrics(out / "metrics.jsonl")[0]
    for group, lr in rates.items():
        assert row[f"lr_{group}"] == pytest.approx(lr)
    # Adam's first step moves a weight by about lr * sign(grad): the largest change of each
    # group is its own rate, not the global one.
    trained, base = weights(out / "model"), weights(tiny_model_dirs["smolvlm"])
    prefixes = {"vision": "model.vision_model.", "connector": "model.connector.",
                "llm": "model.text_model.", "head": "lm_head."}
    for group, prefix in prefixes.items():
        delta = max((trained[k] - base[k]).abs().max().item() for k in base if k.startswith(prefix))
        assert rates[group] * 0.5 < delta <= rates[group] * 1.01, (group, delta)


@pytest.mark.parametrize(("mode", "family"), [("lora", "smolvlm"), ("qlora", "smolvlm2"), ("qlora", "llava_onevision_1_5")])
def test_lora_and_qlora_train_adapters_only(tmp_path, train_args, mode, family):
    out = tmp_path / mode
    extra = ["train.gradient_checkpointing=true"] if mode == "qlora" else []
    result = ok(run_hpc_train("train", *train_args(family, out, "train.max_steps=3", f"train.mode={mode}",
                                                   "eval.generate=false", *extra)))
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in tensors.items())
    assert "trainable" in result.stdout and all(loss == loss for loss in losses(out))
    if mode == "qlora":
        quantized = next(line for line in result.stdout.splitlines() if line.startswith("4-bit NF4"))
        assert "llm" in quantized and "unquantized: vision, connector, head" in quantized
    if mode == "lora":
        # The exported adapter, applied to the base model by `hpc-train eval`, gives the loss the
        # training run measured with its in-memory adapter.
        trained = json.loads((out / "eval_results.json").read_text())
        again = tmp_path / "eval"
        ok(run_hpc_train("eval", *train_args("smolvlm", again, f"model.adapter={adapter}",
                                             "eval.generate=false"), nproc=1))
        evaluated = json.loads((again / "eval_results.json").read_text())
        assert evaluated["mode"] == "baseline"
        assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-5)


def test_signal_checkpoints_requeues_and_resume_reproduces_losses(tmp_path, train_args):
    steps = "train.max_steps=14"
    reference = tmp_path / "reference"
    # LoRA with dropout: the resumed run must draw the very same dropout masks
    ok(run_hpc_train("train", *train_args("smolvlm", reference, steps, "eval.generate=false", "train.mode=lora",
                                          "lora.dropout=0.1")))
    out = tmp_path / "interrupted"
    args = train_args("smolvlm", out, steps, "eval.generate=false", "train.mode=lora", "lora.dropout=0.1")
    import psutil

    proc = start_until(hpc_train_cmd("train", *args), logged_steps(out, 3), what="training never reached step 3")
    for rank in psutil.Process(proc.pid).children():  # the rank processes, as SLURM signals tasks
        rank.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    # The first rank to exit leaves with the requeue status (torchrun reports it as the root
    # cause) and rank 0 leaves a marker a launcher can read. torchrun sends SIGTERM to ranks still
    # tearing down when it sees that exit (the checkpoint and marker are complete by then: every
    # rank passed the barrier after them), so the others show 75 or -15, never another code.
    root_cause = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", output, re.S)
    assert root_cause and root_cause.group(1) == str(REQUEUE_EXIT_CODE), output[-4000:]
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", output))
    assert codes <= {str(REQUEUE_EXIT_CODE), str(-signal.SIGTERM)}, output[-4000:]
    marker = json.loads((out / "requeue.json").read_text())
    saved = (out / "checkpoints" / "latest").read_text().strip()
    assert marker["checkpoint"].endswith(saved) and marker["signal"] == "SIGUSR1"
    stopped_at = int(saved.split("-")[1])
    assert 3 <= stopped_at < 14 and marker["step"] == stopped_at
    first_part = json.loads((out / "profile" / "report.json").read_text())
    ok(run_hpc_train("train", *args))  # the requeued job
    assert not (out / "requeue.json").exists()
    resumed, full = losses(out), losses(reference)
    assert len(resumed) == len(full) == 14
    assert resumed == pytest.approx(full, rel=1e-5, abs=1e-6)
    # The requeued job's report covers its own steps; the first job's is kept beside it.
    kept = json.loads((out / "profile" / f"report.steps-1-{stopped_at}.json").read_text())
    assert kept == first_part and kept["steps"]["last"] == stopped_at
    assert json.loads((out / "profile" / "report.json").read_text())["steps"]["first"] == stopped_at + 1


@pytest.mark.parametrize(("family", "ds"), [("smolvlm", "zero3"), ("llava_onevision", "zero3"),
                                            ("llava_onevision", "zero2"), ("llava_onevision_1_5", "zero3")])
def test_rank_with_text_only_batches_does_not_hang(tmp_path, synthetic_data, train_args, family, ds):
    """Rank 0 sees images and videos, rank 1 only text: every rank must still run the same
    vision modules, or ZeRO-3 waits forever on a gather the other rank never joins."""
    from hpc_train.train.data_order import rank_micro_batches

    records = [json.loads(line) for line in (synthetic_data / "train.jsonl").read_text().splitlines()]
    text = [r for r in records if r["kind"] == "text"]
    media = [r for r in records if r["kind"] in ("image", "video", "multi_image")]
    n, micro = 16, 4
    plan = {rank: [i for batch in rank_micro_batches(n, epoch=0, seed=0, rank=rank, world_size=2,
                                                     micro_batch=micro, grad_accum=1) for i in batch]
            for rank in (0, 1)}
    ordered: list[dict] = [{}] * n
    text_cycle = (text * n)[: len(plan[1])]
    for i, record in zip(plan[1], text_cycle, strict=True):
        ordered[i] = {**record, "id": f"text-{i}"}
    for i, record in zip(plan[0], media, strict=False):
        ordered[i] = record
    assert all(ordered) and any("video" in r for r in ordered)
    data = tmp_path / "skewed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    out = tmp_path / "run"
    ok(run_hpc_train("train", *train_args(family, out, f"data.train={data}", f"data.media_root={synthetic_data}",
                                          "train.max_steps=2", "train.mode=full",
                                          f"deepspeed.config=ds_configs/{ds}.json", "eval.generate=false"),
                     timeout=300))
    assert len(losses(out)) == 2 and all(loss == loss for loss in losses(out))


def test_non_finite_loss_stops_with_step_and_sample_ids(tmp_path, train_args):
    out = tmp_path / "nan"
    result = run_hpc_train("train", *train_args("smolvlm", out, "train.max_steps=30", "train.mode=full",
                                                "train.lr=1e6", "train.grad_clip=null", "train.save_every=1",
                                                "eval.generate=false"), nproc=1)
    assert result.returncode == 3, result.stderr[-3000:]
    message = result.stderr
    assert "non-finite" in message or "gradient norm" in message
    assert "last good checkpoint is" in message
    if "non-finite loss on samples" in message:
        assert "train_" in message  # the batch's sample ids are named


def test_qlora_under_zero3_on_llava_onevision_trains_and_resumes(tmp_path, train_args):
    """2 ranks: the 4-bit weights partitioned like any other; a run stopped after its step-1
    checkpoint (the checkpoint alone, as a kill leaves it) resumes to the uninterrupted step 2."""
    out, stopped = tmp_path / "qlora_z3", tmp_path / "stopped"
    setting = ("train.max_steps=2", "train.save_every=1", "train.mode=qlora", "deepspeed.config=ds_configs/zero3.json",
               "eval.generate=false")
    result = ok(run_hpc_train("train", *train_args("llava_onevision", out, *setting)))
    assert "4-bit NF4" in result.stdout
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors and all(torch.isfinite(v).all() for v in tensors.values())
    assert len(losses(out)) == 2
    shutil.copytree(out / "checkpoints" / "step-00000001", stopped / "checkpoints" / "step-00000001")
    (stopped / "checkpoints" / "latest").write_text("step-00000001")
    resumed = ok(run_hpc_train("train", *train_args("llava_onevision", stopped, *setting)))
    assert f"resumed from {stopped / 'checkpoints' / 'step-00000001'} at step 1" in resumed.stdout
    assert losses(stopped) == pytest.approx(losses(out)[1:], rel=1e-5)
    again = load_file(stopped / "adapter" / "adapter_model.safetensors")
    assert again.keys() == tensors.keys()
    assert all(torch.allclose(again[k], tensors[k], rtol=1e-5, atol=1e-7) for k in tensors)


def test_baseline_evaluation_under_zero3_matches_single_process(tmp_path, train_args):
    z3, single = tmp_path / "z3", tmp_path / "single"
    ok(run_hpc_train("train", *train_args("llava_onevision", z3, "train.mode=baseline",
                                          "deepspeed.config=ds_configs/zero3.json")))
    ok(run_hpc_train("eval", *train_args("llava_onevision", single), nproc=1))
    a = json.loads((z3 / "eval_results.json").read_text())
    b = json.loads((single / "eval_results.json").read_text())
    assert a["mode"] == b["mode"] == "baseline" and not (z3 / "checkpoints").exists()
    assert a["samples"] == b["samples"] == 8
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["accuracy"] == b["accuracy"]
    # the two ranks' shares come back in record order, as one process generates them
    assert [(r["id"], r["prediction"]) for r in a["records"]] == [(r["id"], r["prediction"]) for r in b["records"]]
    assert a["metrics"] == pytest.approx(b["metrics"])


def planned(out: Path) -> dict:
    """The run's plan as its profiling report records it (steps, packing efficiency)."""
    return read_report(out / "profile" / "report.json")["run"]


@pytest.fixture(scope="module")
def packed_single(tmp_path_factory, train_args):
    out = tmp_path_factory.mktemp("packed_single")
    result = ok(run_hpc_train("train", *train_args(
        "smolvlm", out, "data.packing=true", "data.max_seq_len=128", "train.micro_batch_size=1",
        "train.grad_accum=2", "train.epochs=2", "train.mode=full", "train.log_every=1", "eval.generate=false"),
        nproc=1))
    return out, result


def test_packed_run_takes_exactly_the_planned_steps(packed_single):
    out, result = packed_single
    assert 0 < planned(out)["packing_efficiency"] <= 1
    steps = planned(out)["planned_steps"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert max(r["epoch"] for r in rows) >= 1  # the plan spans both epochs
    assert all(r["tokens"] <= r["slot_tokens"] for r in rows)


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_packed_two_ranks_match_single_process(packed_single, tmp_path, train_args, ds):
    """Same global batch: 2 ranks x 1 row vs 1 process x 2 accumulated rows."""
    single, _ = packed_single
    out = tmp_path / ds
    ok(run_hpc_train("train", *train_args(
        "smolvlm", out, "data.packing=true", "data.max_seq_len=128", "train.micro_batch_size=1",
        "train.grad_accum=1", "train.epochs=2", "train.mode=full", "train.log_every=1", "eval.generate=false",
        f"deepspeed.config=ds_configs/{ds}.json")))
    assert planned(out)["planned_steps"] == len(losses(single))
    assert losses(out) == pytest.approx(losses(single), rel=1e-4)


def test_packed_training_with_per_sample_loss(tmp_path, train_args):
    out = tmp_path / "sample_loss"
    ok(run_hpc_train("train", *train_args(
        "llava_onevision", out, "data.packing=true", "data.packing_loss=sample", "data.max_seq_len=256",
        "train.micro_batch_size=1", "train.max_steps=3", "train.mode=full", "train.log_every=1",
        "eval.generate=false")))
    values = losses(out)
    assert len(values) == 3 and all(v == v and v > 0 for v in values)


def test_llava_packing_refuses_videos_of_different_frame_counts_before_step_one(tmp_path, synthetic_data,
                                                                               train_args):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    short = next(r for r in records if "video" in r and "video_clip" not in r)
    short["video_clip"] = [0, 0.5]  # 2 frames where the others give 4
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    result = run_hpc_train("train", *train_args(
        "llava_onevision", out, "data.packing=true", "data.max_seq_len=4096", "train.micro_batch_size=1",
        f"data.train={data / 'train.jsonl'}", "train.max_steps=2"), nproc=1)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"[id {short['id']}]; 4 frames:" in result.stderr
            and "Fix: make every video give the same count: data.video.sampling=uniform "
                "data.video.num_frames=2" in result.stderr), result.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists()


def test_rank_whose_micro_batch_is_all_skipped_does_not_stall_the_others(tmp_path, synthetic_data, train_args):
    import shutil

    from hpc_train.train.data_order import rank_micro_batches

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    kept = [r for r in records if r["kind"] != "text"][:16]
    assert len(kept) == 16
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    doomed = rank_micro_batches(16, epoch=0, seed=0, rank=1, world_size=2, micro_batch=4, grad_accum=1)[0]
    for i in doomed:
        for key in ("image", "video", "audio"):
            paths = kept[i].get(key, [])
            for path in [paths] if isinstance(paths, str) else paths:
                (data / path).unlink(missing_ok=True)
    out = tmp_path / "run"
    result = ok(run_hpc_train("train", *train_args(
        "smolvlm", out, f"data.train={data / 'train.jsonl'}",
        "data.on_bad_sample=skip", "train.max_steps=2", "train.mode=full", "eval.generate=false",
        "data.eval=null"), timeout=300))
    assert "no usable sample" in result.stdout
    assert len(losses(out)) == 2
