"""Sequence parallelism (DeepSpeed's Ulysses) on real ranks: N = 2 gives the losses and the
gradient of every trained parameter of N = 1, and the group shares the vision work."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpc_train.train.metrics import read_metrics

from .conftest import RUN_TIMEOUT_S, child_env

WORKER = Path(__file__).with_name("sp_worker.py")


def kinds_file(synthetic_data: Path, kinds: tuple[str, ...]) -> Path:
    """The synthetic training records of ``kinds`` only (their media resolve next to them)."""
    path = synthetic_data / f"sp_{'_'.join(kinds)}.jsonl"
    if not path.exists():
        lines = (synthetic_data / "train.jsonl").read_text().splitlines()
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["kind"] in kinds))
    return path


def train(out: Path, family: str, model_dir: Path, data: Path, *overrides: str, nproc: int) -> dict:
    """A run of the gradient-recording worker: its per-step metrics, gradients and tiles encoded per rank."""
    grads = out / "grads.pt"
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    args = [f"output_dir={out / 'run'}", f"model.path={model_dir}", "model.preset=null", f"data.train={data}",
            "data.eval=null", "data.num_workers=0", "train.log_every=1", "eval.generate=false", "lora.dropout=0",
            *overrides]
    done = subprocess.run([*launcher, str(WORKER), str(grads), f"tiny_{family}", *args], env=child_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-6000:]
    return {"metrics": [r for r in read_metrics(out / "run" / "metrics.jsonl") if "loss" in r],
            "grads": torch.load(grads), "log": done.stdout,
            **dict(zip(("encoded", "decoded"), zip(*(map(int, (out / f"grads.pt.rank{r}").read_text().split())
                                                     for r in range(nproc)), strict=True), strict=True))}


def assert_same_training(split: dict, whole: dict) -> None:
    assert [m["loss"] for m in split["metrics"]] == pytest.approx([m["loss"] for m in whole["metrics"]], rel=1e-5)
    for key in ("tokens", "supervised_tokens", "samples"):  # each token counted once over the group
        assert [m[key] for m in split["metrics"]] == [m[key] for m in whole["metrics"]], key
    assert split["grads"].keys() == whole["grads"].keys()
    for step, grads in whole["grads"].items():
        scale = max(g.abs().max() for g in grads.values())
        # After step 1 the weights differ by Adam's first update, which turns rounding-level
        # differences of near-zero gradients into learning-rate-sized steps: a looser check.
        rtol, atol = (1e-5, 1e-6) if step == 1 else (1e-3, 1e-4)
        assert split["grads"][step].keys() == grads.keys()
        for name, grad in grads.items():
            # relative to the step's largest gradient: some are exactly zero in theory (a key bias)
            assert torch.allclose(split["grads"][step][name], grad, rtol=rtol, atol=atol * scale), (step, name)


CASES = {
    # a long video (many frames, trained tower), padded, ZeRO-2
    "smolvlm-video-trained-vision": ("smolvlm", ("video",), ["train.mode=full", "data.video.num_frames=12",
                                                            "train.micro_batch_size=2"]),
    # the split side's MLPs also in tiles (DeepSpeed's TiledMLP): ZeRO must reduce whole gradients
    "llava-video-lora-zero3-tiled-mlp": ("llava_onevision", ("video",), [
        "train.mode=lora", "data.video.num_frames=12", "train.micro_batch_size=1",
        "deepspeed.config=ds_configs/zero3.json"], ["train.tiled_mlp=3"]),
    "smolvlm2-video-zero2-tiled-mlp": ("smolvlm2", ("video", "image"), [
        "train.mode=full", "data.video.num_frames=6", "train.micro_batch_size=2"], ["train.tiled_mlp=5"]),
    "llava-video-frozen-vision-zero3": ("llava_onevision", ("video",), [
        "train.mode=full", "model.freeze=[vision]", "data.video.num_frames=12", "train.micro_batch_size=1",
        "deepspeed.config=ds_configs/zero3.json"]),
    # packed rows of every kind of sample, sample boundaries across the split
    "smolvlm2-packed-lora-checkpointing": ("smolvlm2", ("text", "image", "multi_image", "video", "audio"), [
        "train.mode=lora", "lora.target=all", "data.packing=true", "data.max_seq_len=384",
        "train.micro_batch_size=1", "train.gradient_checkpointing=true"]),
    "llava-packed-sample-loss-trained-vision": ("llava_onevision", ("text", "image", "video", "audio"), [
        "train.mode=full", "data.packing=true", "data.packing_loss=sample", "data.max_seq_len=512",
        "train.micro_batch_size=1"]),
    "smolvlm-text-only-qlora": ("smolvlm", ("text",), ["train.mode=qlora", "train.micro_batch_size=3"]),
    # images at their own sizes and each video's frames shared by grid; LoRA in the tower too
    "llava15-packed-lora-all-zero3": ("llava_onevision_1_5", ("text", "image", "video", "audio"), [
        "train.mode=lora", "lora.target=all", "data.packing=true", "data.max_seq_len=512",
        "train.micro_batch_size=1", "deepspeed.config=ds_configs/zero3.json"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_of_one_group_train_as_one_process(tmp_path, synthetic_data, tiny_model_dirs, case):
    family, kinds, overrides, *split_only = CASES[case]
    data = kinds_file(synthetic_data, kinds)
    common = [*overrides, "train.max_steps=2", f"data.media_root={synthetic_data}"]
    whole = train(tmp_path / "n1", family, tiny_model_dirs[family], data, *common, nproc=1)
    split = train(tmp_path / "n2", family, tiny_model_dirs[family], data, *common, "train.sequence_parallel=2",
                  *(split_only[0] if split_only else []), nproc=2)
    assert "sequence parallelism: 1 groups of 2 ranks" in split["log"]
    assert ("tiled MLP: each language-model MLP in" in split["log"]) == bool(split_only)
    assert_same_training(split, whole)
    if "video" in kinds:  # the group decodes each video frame once, about half on each rank
        assert sum(split["decoded"]) == whole["decoded"][0] > 0
        assert max(split["decoded"]) <= whole["decoded"][0] // 2 + len(split["metrics"]) * 2
    if family in ("smolvlm", "smolvlm2") and "video" in kinds:
        # the group encodes each tile and frame once, about half on each rank
        assert sum(split["encoded"]) == whole["encoded"][0] > 0
        assert max(split["encoded"]) <= whole["encoded"][0] // 2 + 2
    elif "video" in kinds:  # LLaVA-OneVision shares the frames and whole samples' images
        assert max(split["encoded"]) < whole["encoded"][0]


def test_two_groups_of_two_match_data_parallel_two(tmp_path, synthetic_data, tiny_model_dirs):
    data = kinds_file(synthetic_data, ("video", "image", "text"))
    common = ["train.mode=full", "train.max_steps=2", "train.micro_batch_size=1", "data.video.num_frames=8",
              f"data.media_root={synthetic_data}"]
    plain = train(tmp_path / "dp2", "llava_onevision", tiny_model_dirs["llava_onevision"], data, *common, nproc=2)
    split = train(tmp_path / "dp2sp2", "llava_onevision", tiny_model_dirs["llava_onevision"], data, *common,
                  "train.sequence_parallel=2", nproc=4)
    assert "2 groups of 2 ranks" in split["log"] and "x 2 data-parallel ranks" in split["log"]
    assert_same_training(split, plain)


def test_a_signalled_run_resumes_to_the_losses_of_an_uninterrupted_one(tmp_path, train_args):
    import psutil

    from .conftest import hpc_train_cmd, logged_steps, ok, run_hpc_train, start_until

    args = ["train.max_steps=16", "eval.generate=false", "train.mode=lora", "lora.dropout=0.1",
            "train.sequence_parallel=2", "train.micro_batch_size=2", "data.eval=null"]
    reference = tmp_path / "reference"
    ok(run_hpc_train("train", *train_args("smolvlm", reference, *args)))
    out = tmp_path / "interrupted"
    proc = start_until(hpc_train_cmd("train", *train_args("smolvlm", out, *args)), logged_steps(out, 2))
    metrics = out / "metrics.jsonl"
    for rank in psutil.Process(proc.pid).children():
        rank.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=RUN_TIMEOUT_S)
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 2 <= stopped_at < 16
    ok(run_hpc_train("train", *train_args("smolvlm", out, *args)))
    assert [r["loss"] for r in read_metrics(metrics) if "loss" in r] == pytest.approx(
        [r["loss"] for r in read_metrics(reference / "metrics.jsonl") if "loss" in r], rel=1e-5)
