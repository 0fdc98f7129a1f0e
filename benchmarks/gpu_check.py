"""The checks only a GPU can make, in one short call (a lent GPU is scarce); ``--cpu`` runs every
part end to end on the CPU at small sizes, so the script itself is tested in CI.

    python benchmarks/gpu_check.py [--cpu] [--only NAME ...] [OUT]    # or: bash benchmarks/gpu_check.sh

Each part prints PASS / FAIL with its numbers (its full output in ``OUT/NAME.log``); the exit
status is the number of FAILs. Nothing is installed: parts that need a package the machine
lacks (flash-attn) say so and check what is there. Under 8 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BF16_TOLERANCE = {"out": 2e-2, "grad": 5e-2}
"""bf16 kernels against an fp32 per-sample reference (unit-variance inputs): largest absolute
difference of the attention output and of its input gradients."""


class Check:
    def __init__(self, out: Path, cpu: bool) -> None:
        self.out, self.cpu = out, cpu
        self.shared = out / "shared"  # the dataset and tiny models every part may use
        self.work = out / "work"

    def fresh(self, part: str) -> None:
        """``part``'s own empty folder: a second call in the same OUT starts its runs over, never
        resuming the checkpoints an earlier call left."""
        self.work = self.out / "work" / part
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)

    def python(self, *args: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(args[:3])} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def data_and_model(self, family: str = "smolvlm") -> tuple[Path, Path]:
        data, model = self.shared / "data", self.shared / f"tiny_{family}"
        if not (data / "train.jsonl").is_file():  # written last: a folder without it is unfinished
            self.python("-m", "hpc_train", "make-data", str(data))
        if not (model / "config.json").is_file():
            self.python("-m", "hpc_train", "make-tiny", family, str(model))
        return data, model

    def train(self, name: str, *overrides: str) -> dict:
        """A short ``hpc-train train`` (one process) and its profiling report."""
        data, model = self.data_and_model()
        run = self.work / name
        model_source = ["model.preset=null", f"model.path={model}"] if self.cpu else \
            ["model.preset=smolvlm-256m", "model.path=null"]
        self.python("-m", "hpc_train", "train", "tiny_smolvlm", *model_source, f"data.train={data / 'train.jsonl'}",
                    "data.eval=null", f"output_dir={run}", "train.log_every=1", "profile.enabled=true",
                    "profile.warmup_steps=2", *overrides)
        return json.loads((run / "profile" / "report.json").read_text())


def doctor_gpu_rows(c: Check) -> str:
    path = c.work / "doctor.json"
    subprocess.run([sys.executable, "-m", "hpc_train", "doctor", "--json", str(path)], cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    rows = {r["name"]: r for r in json.loads(path.read_text())["checks"]}
    if c.cpu:
        assert rows["packing attention"]["found"] == "per-sample SDPA", rows["packing attention"]
        return f"CUDA: {rows['CUDA']['found']}; packing attention: {rows['packing attention']['found']}"
    assert rows["CUDA"]["status"] == "ok", rows["CUDA"]
    gpus = [r for n, r in rows.items() if n.startswith("GPU ")]
    assert gpus and all(r["status"] == "ok" and "TFLOP/s" in r["note"] for r in gpus), gpus
    assert rows["compute dtype"]["found"] == "bf16", rows["compute dtype"]
    assert rows["NCCL"]["status"] == "ok", rows["NCCL"]
    assert rows["packing attention"]["found"] in ("flash-attn varlen", "torch varlen"), rows["packing attention"]
    bnb = rows["bitsandbytes (QLoRA)"]
    assert bnb["status"] == "ok" or "does not import" in bnb["found"], bnb
    return "; ".join(f"{n}: {r['found']}" for n, r in rows.items() if n in ("CUDA", "NCCL", "packing attention"))


def device_binding(c: Check) -> str:
    import torch

    from hpc_train.config_file import load_config
    from hpc_train.device import choose_device, native_bf16
    from hpc_train.topology import DistInfo
    from hpc_train.train.trainable_model import compute_dtype

    if c.cpu:
        device = choose_device(DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1), "cpu")
        assert device.type == "cpu"
        return str(device)
    os.environ["CUDA_VISIBLE_DEVICES"], os.environ["LOCAL_RANK"] = "0", "1"
    device = choose_device(DistInfo(rank=1, local_rank=1, world_size=2, local_world_size=2))
    assert device == torch.device("cuda", 0) and os.environ["LOCAL_RANK"] == "0", (device, os.environ["LOCAL_RANK"])
    os.environ["LOCAL_RANK"] = "0"
    want = torch.bfloat16 if native_bf16(torch.cuda.get_device_capability(device)) else torch.float32
    assert compute_dtype(load_config(None, ["model.preset=tiny"]), device) == want
    return f"{device}, compute dtype {want}"


def varlen_exactness(c: Check) -> str:
    """Every kernel this machine can run against an fp32 per-sample reference, output and gradients."""
    import torch
    import torch.nn.functional as F

    from hpc_train.models.attention import KERNELS, attention_with
    from hpc_train.models.varlen_backend import (
        FLASH_ATTN,
        PER_SAMPLE,
        TORCH_VARLEN,
        flash_varlen,
        torch_varlen_present,
    )

    device = torch.device("cpu" if c.cpu else "cuda")
    dtype = torch.float32 if c.cpu else torch.bfloat16
    present = {FLASH_ATTN: flash_varlen() is not None, TORCH_VARLEN: torch_varlen_present(), PER_SAMPLE: True}
    usable = [PER_SAMPLE] if c.cpu else [b for b, there in present.items() if there]
    lengths = [37, 300, 5, 1200, 64] if not c.cpu else [7, 30, 5, 12]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, bounds[-1], 64, generator=gen)
    kv = torch.randn(2, 1, 2, bounds[-1], 64, generator=gen)  # GQA: 8 query heads over 2

    def reference() -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [t.clone().double().requires_grad_() for t in (q, kv[0], kv[1])]
        pieces = [F.scaled_dot_product_attention(leaves[0][:, :, s:e], leaves[1][:, :, s:e].repeat_interleave(4, 1),
                                                 leaves[2][:, :, s:e].repeat_interleave(4, 1), is_causal=True)
                  for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        out = torch.cat(pieces, dim=2).transpose(1, 2)
        out.backward(torch.ones_like(out))
        return out.float(), [leaf.grad.float() for leaf in leaves]

    want, want_grads = reference()
    lines = []
    module = torch.nn.Module().eval()
    for backend in usable:
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, kv[0], kv[1])]
        out, _ = attention_with(KERNELS[backend])(module, *leaves, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                  max_length_q=max(lengths), max_length_k=max(lengths),
                                                  sample_bounds=tuple(bounds))
        out.backward(torch.ones_like(out))
        err = (out.float().cpu() - want).abs().max().item()
        grad_err = max((leaf.grad.float().cpu() - g).abs().max().item() for leaf, g in zip(leaves, want_grads, strict=True))
        tolerance = (1e-5, 1e-4) if dtype == torch.float32 else (BF16_TOLERANCE["out"], BF16_TOLERANCE["grad"])
        assert err <= tolerance[0] and grad_err <= tolerance[1], (backend, err, grad_err, tolerance)
        lines.append(f"{backend} ({str(dtype).removeprefix('torch.')}): output {err:.1e}, gradients {grad_err:.1e}")
    if not c.cpu and TORCH_VARLEN not in usable:
        raise AssertionError(f"this torch ({torch.__version__}) has no torch.nn.attention.varlen: " + "; ".join(lines))
    return "; ".join(lines) + ("" if c.cpu or present[FLASH_ATTN] else "; flash-attn is not installed here")


def host_syncs(c: Check) -> str:
    """The real loop's device reads per optimizer step (counted by call site), and on a GPU the
    synchronizations CUDA itself reports (``torch.cuda.set_sync_debug_mode``)."""
    import warnings

    import torch

    from benchmarks.host_reads import count

    accumulation = 2 if c.cpu else 8
    lines = []
    # LLaVA-OneVision's model code reads its image metadata (kept on the host) and checks its
    # placeholders on the device: only CUDA's own count tells those apart, so it runs on a GPU.
    for family in ("smolvlm",) if c.cpu else ("smolvlm", "llava_onevision"):
        data, model = c.data_and_model(family)
        for shape in ("padded", "packed"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if not c.cpu:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    reads, steps = count(c.work, family, shape, accumulation, 2, data=data, model=model)
                finally:
                    if not c.cpu:
                        torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            scalar = sum(n for site, n in reads.sites.items() if site.kind == "scalar") / steps
            ours = reads.by_owner()["hpc_train"] / steps
            assert ours <= 2 and (family != "smolvlm" or scalar <= 16), reads.by_site()
            lines.append(f"{family} {shape}: {scalar:.1f} scalar reads, {reads.total / steps:.1f} in all, ours "
                         f"{ours:.1f}" + ("" if c.cpu else f", CUDA-reported syncs {syncs / steps:.1f}") + " per step")
    return "; ".join(lines)


def packed_vs_padded(c: Check) -> str:
    args = ["--samples", "120", "--steps", "3", "--batch", "4", "--max-seq-len", "512"] if c.cpu else \
        ["--preset", "smolvlm-256m", "--max-seq-len", "8192", "--steps", "8", "--samples", "1200"]
    text = c.python("benchmarks/packing.py", *args)
    results = json.loads(text[text.index("{"):])
    ratio = results["text-heavy"]["speedup"]
    assert c.cpu or ratio >= 2.0, results
    return f"text-heavy packed / padded tokens/s {ratio:.2f} (goal >= 2.0), video-heavy {results['video-heavy']['speedup']:.2f}"


def profiler_overhead(c: Check) -> str:
    args = ["--steps", "4"] if c.cpu else ["--preset", "smolvlm-256m", "--steps", "40"]
    text = c.python("benchmarks/profiler_overhead.py", *args)
    ratio = float(re.search(r"ratio profiled / unprofiled: ([0-9.]+)", text).group(1))
    assert c.cpu or ratio <= 1.01, text
    return f"profiled / unprofiled step time {ratio:.4f} (goal <= 1.01)"


def mfu_and_memory(c: Check) -> str:
    """A packed bf16 LoRA and full step (MFU from the profiling report), and QLoRA's peak against LoRA's."""
    size = ["data.max_seq_len=512", "train.max_steps=4"] if c.cpu else ["data.max_seq_len=8192", "train.max_steps=12"]
    common = ["data.packing=true", "train.micro_batch_size=1", "train.grad_accum=1", *size]
    reports = {mode: c.train(f"run-{mode}", f"train.mode={mode}", *common) for mode in ("lora", "full", "qlora")}
    lines = []
    for mode, report in reports.items():
        flops, memory = report["flops"], report["memory"]
        assert report["run"]["packed_attention"] == ("per-sample SDPA" if c.cpu else reports["lora"]["run"]["packed_attention"])
        assert c.cpu or flops["mfu"], flops
        lines.append(f"{mode}: MFU {flops['mfu'] or 0:.1%}, train peak {memory.get('gpu_train_peak_allocated_gib')} GiB")
    if not c.cpu:
        lora, qlora = (reports[m]["memory"]["gpu_train_peak_allocated_gib"] for m in ("lora", "qlora"))
        assert qlora < lora, (qlora, lora)
    return "; ".join(lines)


def bf16_zero2_run(c: Check) -> str:
    """The shipped ZeRO-2 config with bf16 compute (fp32 on CPU), packing: finite, falling loss."""
    data, model = c.data_and_model()
    run = c.work / "zero2"
    c.python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "hpc_train", "train",
             "tiny_smolvlm", f"model.path={model}", "model.preset=null", f"data.train={data / 'train.jsonl'}",
             f"data.eval={data / 'eval.jsonl'}", f"output_dir={run}", "train.mode=full",
             f"train.max_steps={6 if c.cpu else 20}", "train.log_every=1", "data.packing=true",
             "data.max_seq_len=1024", "eval.max_samples=16", *(["train.device=cpu"] if c.cpu else []))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(v == v for v in losses) and losses[-1] < losses[0], losses
    memory = json.loads((run / "profile" / "report.json").read_text())["memory"]
    if not c.cpu:
        assert all(memory[f"gpu_{s}_peak_allocated_gib"] for s in ("train", "eval", "export")), memory
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"


def vision_cache_run(c: Check) -> str:
    """Two LoRA runs over the same first steps sharing ``data.vision_cache``: the second computes no
    features (pinned copies and the writer's CUDA events on a GPU) and has the first's losses."""
    cache = c.work / "vision-cache"
    common = ["train.mode=lora", "lora.target=llm", "lora.dropout=0", "train.max_steps=4", "train.micro_batch_size=4",
              f"data.vision_cache={cache}"]
    runs = []
    for name in ("cache-cold", "cache-warm"):
        c.train(name, *common)
        runs.append([json.loads(line) for line in (c.work / name / "metrics.jsonl").read_text().splitlines()
                     if "loss" in json.loads(line)])
    cold, warm = runs
    assert [s["vision_computed_samples"] for s in warm] == [0] * len(warm) and sum(
        s["vision_cached_samples"] for s in warm), warm
    worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(cold, warm, strict=True))
    assert worst <= (1e-6 if c.cpu else 1e-2), (cold, warm)
    stored = sum(f.stat().st_size for f in cache.rglob("*.safetensors"))
    return (f"warm run: {sum(s['vision_cached_samples'] for s in warm):.0f} samples from the cache, none computed; "
            f"losses' largest relative difference {worst:.1e}; cache {stored / 2**10:.0f} KiB")


def plan_accuracy(c: Check) -> str:
    """hpc-train plan against the real runs' peaks (GPU: max_memory_allocated, bf16, step time)."""
    args = ["--models", "tiny-smolvlm", "--modes", "lora"] if c.cpu else ["--gpu"]
    text = c.python("benchmarks/plan_accuracy.py", *args)
    worst = float(re.search(r"worst error: ([0-9.]+)%", text).group(1))
    assert worst <= 10.0, text
    return text.strip().splitlines()[-1] + " | " + " | ".join(text.strip().splitlines()[1:-1])


def video_decode_on_gpu(c: Check) -> str:
    """torchcodec's GPU decoder (``data.video.device=cuda``) against CPU decoding: a 60 s 1080p
    clip's 32 frames, time and frames (on the CPU: the device path itself, identical frames)."""
    args = ["--device", "cpu", "--seconds", "2", "--size", "320x180", "--frames", "8"] if c.cpu else []
    text = c.python("benchmarks/decode_device.py", *args)
    result = json.loads(text.strip().splitlines()[-1])
    assert result["same_shape"], result
    assert result["mean_grey_levels"] <= (0.0 if c.cpu else 2.0), result  # NVDEC's colour conversion may round
    return (f"{result['clip']}: CPU {result['cpu_s']:.2f} s, {result['device']} {result['device_s']:.2f} s "
            f"({result['speedup']:.1f}x); frames differ by {result['mean_grey_levels']:.2f} grey levels on average "
            f"(max {result['max_grey_levels']})")


PARTS: dict[str, Callable[[Check], str]] = {
    "doctor-gpu-rows": doctor_gpu_rows, "device-binding": device_binding, "varlen-exactness": varlen_exactness,
    "host-syncs": host_syncs, "packed-vs-padded": packed_vs_padded, "profiler-overhead": profiler_overhead,
    "mfu-and-memory": mfu_and_memory, "bf16-zero2-run": bf16_zero2_run, "vision-cache-run": vision_cache_run,
    "plan-accuracy": plan_accuracy, "video-decode-on-gpu": video_decode_on_gpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="gpu_check")
    parser.add_argument("--cpu", action="store_true", help="every part on the CPU at small sizes")
    parser.add_argument("--only", nargs="+", choices=sorted(PARTS), help="run these parts only")
    args = parser.parse_args(argv)
    check = Check(Path(args.out).resolve(), args.cpu)
    fails = 0
    for name in args.only or PARTS:
        check.fresh(name)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                said = PARTS[name](check)
            print(f"PASS {name}: {said}", flush=True)
        except Exception:
            traceback.print_exc(file=log)
            fails += 1
            print(f"FAIL {name} (see {check.out / (name + '.log')})", flush=True)
        (check.out / f"{name}.log").write_text(log.getvalue())
    print(f"{fails} check(s) failed; outputs in {check.out}/")
    return fails


if __name__ == "__main__":
    raise SystemExit(main())
