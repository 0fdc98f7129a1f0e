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
echo "$fails check(s) failed; outputs in $out/"
exit "$fails"
