#!/usr/bin/env bash
# The checks only a GPU can make, in one short call (a lent GPU is scarce). Runs with whatever
# python is there and the checkout on PYTHONPATH; nothing is installed (a device machine may
# have no network), so rows for packages it lacks are left out of the verdict.
#   bash benchmarks/gpu_check.sh [OUT]          # OUT: where results go (default: ./gpu_check)
# Each part prints PASS / FAIL; the exit status is the number of FAILs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
fails=0
check() {  # check NAME COMMAND...: run it, keep its output, say PASS / FAIL
  local name=$1; shift
  if "$@" >"$out/$name.log" 2>&1; then echo "PASS $name"; else echo "FAIL $name (see $out/$name.log)"; fails=$((fails + 1)); fi
}

# hpc-train doctor on a GPU: CUDA usable, each GPU with its datasheet peak, bf16, NCCL, and
# bitsandbytes' CUDA library where bitsandbytes is installed.
"$python" -m hpc_train doctor --json "$out/doctor.json" >"$out/doctor.log" 2>&1
check doctor-gpu-rows "$python" - "$out/doctor.json" <<'PY'
import json, sys
rows = {c["name"]: c for c in json.load(open(sys.argv[1]))["checks"]}
print("\n".join(f"{n:26s} {r['status']:5s} {r['found']}  {r['note']}" for n, r in rows.items()))
assert rows["CUDA"]["status"] == "ok", rows["CUDA"]
gpus = [r for n, r in rows.items() if n.startswith("GPU ")]
assert gpus and all(r["status"] == "ok" and "TFLOP/s" in r["note"] for r in gpus), gpus
assert rows["compute dtype"]["found"] == "bf16", rows["compute dtype"]
assert rows["NCCL"]["status"] == "ok", rows["NCCL"]
bnb = rows["bitsandbytes (QLoRA)"]
assert bnb["status"] == "ok" or "does not import" in bnb["found"], bnb
PY
# Device binding (issue 13): one GPU bound per task, as --gpus-per-task=1 gives it: local rank 1
# of 2 sees its GPU as cuda:0, and LOCAL_RANK says 0 to DeepSpeed; bf16 where the GPU has it,
# flash-attn never for fp32.
check device-binding env CUDA_VISIBLE_DEVICES=0 LOCAL_RANK=1 "$python" - <<'PY'
import os, torch
from hpc_train.device import choose_device, native_bf16
from hpc_train.models.varlen_backend import PER_SAMPLE, varlen_backend
from hpc_train.topology import DistInfo
from hpc_train.train.trainable_model import compute_dtype
from hpc_train.config_file import load_config
device = choose_device(DistInfo(rank=1, local_rank=1, world_size=2, local_world_size=2))
print(device, os.environ["LOCAL_RANK"], torch.cuda.get_device_capability(device))
assert device == torch.device("cuda", 0) and os.environ["LOCAL_RANK"] == "0"
want = torch.bfloat16 if native_bf16(torch.cuda.get_device_capability(device)) else torch.float32
assert compute_dtype(load_config(None, ["model.preset=tiny"]), device) == want
assert varlen_backend(True, torch.float32, torch.cuda.get_device_capability(device)) == PER_SAMPLE
PY

# bf16 DeepSpeed on a GPU (issue 13): the shipped ZeRO-2 config (fp32 reduction and gradient
# accumulation) with bf16 compute, NCCL, packing, 20 steps; the loss must be finite and fall.
check bf16-zero2-run "$python" - "$out" <<'PY'
import json, subprocess, sys
from pathlib import Path
out = Path(sys.argv[1]) / "bf16_run"
subprocess.run([sys.executable, "-m", "hpc_train", "make-data", str(out / "data")], check=True)
subprocess.run([sys.executable, "-m", "hpc_train", "make-tiny", "smolvlm", str(out / "model")], check=True)
done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                       "hpc_train", "train", "tiny_smolvlm", f"model.path={out / 'model'}", "model.preset=null",
                       f"data.train={out / 'data' / 'train.jsonl'}", f"data.eval={out / 'data' / 'eval.jsonl'}",
                       f"output_dir={out / 'run'}", "train.mode=full", "train.max_steps=20", "train.log_every=1",
                       "data.packing=true", "data.max_seq_len=1024", "eval.max_samples=16"],
                      capture_output=True, text=True)
print(done.stdout[-4000:], done.stderr[-4000:])
assert done.returncode == 0
assert "compute dtype bf16" in done.stdout
rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
losses = [r["loss"] for r in rows if "loss" in r]
print(losses)
assert len(losses) == 20 and all(l == l for l in losses) and losses[-1] < losses[0]
memory = json.loads((out / "run" / "profile" / "report.json").read_text())["memory"]
print(memory)
assert memory["gpu_train_peak_allocated_gib"] and memory["gpu_eval_peak_allocated_gib"] and memory["gpu_export_peak_allocated_gib"]
assert memory["gpu_peak_allocated_gib"] >= max(memory[f"gpu_{s}_peak_allocated_gib"] for s in ("train", "eval", "export"))
PY

echo "$fails check(s) failed; outputs in $out/"
exit "$fails"
