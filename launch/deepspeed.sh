#!/usr/bin/env bash
# The DeepSpeed launcher in a SLURM allocation: `deepspeed --launcher slurm`, which starts
# the ranks with srun (no ssh between nodes), on one node too (--force_multi). Run it from the
# batch script, not under srun:
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

# DeepSpeed passes the variables it exports as srun --export=ALL,NAME=value,..., which srun
# cuts at commas (NCCL_IB_HCA=mlx5_0,mlx5_1 would arrive as mlx5_0). Such values go to a file
# in the checkout, which every node sees, and each rank sets them again at its start.
mapfile -t exported < <(python -c 'from deepspeed.launcher.runner import EXPORT_ENVS
from deepspeed.accelerator import get_accelerator
print("\n".join(EXPORT_ENVS + get_accelerator().export_envs()))' 2>/dev/null)
envfile=$PWD/logs/hpc-train-env-$SLURM_JOB_ID
mkdir -p "$PWD/logs"
: >"$envfile"
for var in $(compgen -e); do
  [[ ${!var} == *,* ]] || continue
  for prefix in "${exported[@]}"; do
    if [[ $var == "$prefix"* ]]; then
      printf '%s=%s\n' "$var" "${!var}" >>"$envfile"
      echo "[deepspeed.sh] $var has commas, which srun --export would cut: passed whole through $envfile"
      unset "$var"
      break
    fi
  done
done
if [[ -s $envfile ]]; then export HPC_TRAIN_ENV_FILE=$envfile; else rm -f "$envfile"; fi

echo "[deepspeed.sh] ${#hosts[@]} node(s) (${hosts[*]}) x $nproc process(es), master $MASTER_ADDR:$MASTER_PORT," \
     "hostfile $hostfile, command: $*"
# srun's own options: one task per slot on every node, and a failed rank ends the step.
# --force_multi: srun starts the ranks on one node too, in a job step of their own with the
# GPUs SLURM gave the job. (DeepSpeed's local launch.py would renumber CUDA_VISIBLE_DEVICES
# to 0..n-1 whatever SLURM gave, run the ranks in the batch step, which scancel --signal does
# not reach, and kill them 30 s after the SIGTERM a preemption sends every process.) The
# launcher itself (this process after exec) installs no handler then: it ignores SIGUSR1 and
# SIGTERM, which are the ranks' to take, and waits for srun.
trap '' USR1 TERM
exec deepspeed --hostfile "$hostfile" --launcher slurm --force_multi --no_ssh_check \
  --launcher_args "--nodes=${#hosts[@]} --ntasks-per-node=$nproc --cpus-per-task=$cpus --kill-on-bad-exit=1" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$main" "$@"
