#!/usr/bin/env bash
# The DeepSpeed launcher in a SLURM allocation: `deepspeed --launcher slurm`, which starts
# the ranks with srun (no ssh between nodes). Run it from the batch script, not under srun:
#
#   launch/deepspeed.sh train CONFIG [key=value ...]
#
# Environment: NPROC_PER_NODE (default: GPUs SLURM gave each node, else 1), MASTER_PORT
# (default 10000 + job id % 20000). The hostfile is written to $TMPDIR (or /tmp).
set -euo pipefail

[[ -n ${SLURM_JOB_NODELIST:-} ]] || { echo "[deepspeed.sh] error: not inside a SLURM allocation (sbatch / salloc)" >&2; exit 2; }
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
((nproc > 0)) || nproc=1
cpus=$(( ${SLURM_CPUS_PER_TASK:-$nproc} / nproc > 0 ? ${SLURM_CPUS_PER_TASK:-$nproc} / nproc : 1 ))
export MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
hostfile=${TMPDIR:-/tmp}/hpc-train-hostfile-$SLURM_JOB_ID
: >"$hostfile"
for h in "${hosts[@]}"; do echo "$h slots=$nproc" >>"$hostfile"; done
main=$(python -c 'import hpc_train, pathlib; print(pathlib.Path(hpc_train.__file__).parent / "__main__.py")')

echo "[deepspeed.sh] ${#hosts[@]} node(s) (${hosts[*]}) x $nproc process(es), master $MASTER_ADDR:$MASTER_PORT," \
     "hostfile $hostfile, command: $*"
# srun's own options: one task per slot on every node, and a failed rank ends the step.
exec deepspeed --hostfile "$hostfile" --launcher slurm --no_ssh_check \
  --launcher_args "--nodes=${#hosts[@]} --ntasks-per-node=$nproc --cpus-per-task=$cpus --kill-on-bad-exit=1" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$main" "$@"
