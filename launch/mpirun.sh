#!/usr/bin/env bash
# Training ranks started by MPI: each rank learns its rank, local rank and the master address
# from MPI itself (mpi4py), then joins torch's process group.
#
#   NP=2 launch/mpirun.sh train CONFIG [key=value ...]
#   NP=8 MPIRUN_ARGS="--hostfile hosts --map-by ppr:4:node" launch/mpirun.sh train CONFIG
#
# Environment: NP (ranks; default in a SLURM allocation: its nodes x the GPUs of each, else its
# tasks per node; elsewhere 2), MPIRUN (default mpirun), MPIRUN_ARGS (extra options).
# The variables the ranks need (PATH, the virtualenv, HF_*, DS_*, OMP_*, NCCL_*, PYTHONPATH)
# are exported to every rank with -x. Ranks are not bound to cores (--bind-to none, unless
# MPIRUN_ARGS binds them): Open MPI binds each rank to one core when np <= 2, where its
# DataLoader workers would then share that core.
set -euo pipefail

per_node=""
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  per_node=${SLURM_GPUS_ON_NODE:-0}
  ((per_node > 0)) || per_node=${SLURM_NTASKS_PER_NODE:-1}
fi
np=${NP:-$([[ -n $per_node ]] && echo $(( ${SLURM_NNODES:-1} * per_node )) || echo 2)}
mpirun=${MPIRUN:-mpirun}
command -v "$mpirun" >/dev/null || { echo "[mpirun.sh] error: $mpirun not found. Fix: install Open MPI or MPICH (module load openmpi), or set MPIRUN" >&2; exit 2; }
args=(-np "$np")
if "$mpirun" --version 2>&1 | grep -qi "open mpi"; then
  exports=()
  for var in $(compgen -e); do
    case $var in PATH|LD_LIBRARY_PATH|PYTHONPATH|VIRTUAL_ENV|HF_*|DS_*|OMP_*|NCCL_*|TORCH_*|TOKENIZERS_*|MASTER_*) exports+=(-x "$var");; esac
  done
  args+=("${exports[@]}")
  # Open MPI refuses root unless told; containers and CI machines often run as root.
  [[ $(id -u) == 0 ]] && args+=(--allow-run-as-root)
  [[ ${MPIRUN_ARGS:-} == *--bind-to* ]] || args+=(--bind-to none)
  # the allocation's nodes, evenly, unless MPIRUN_ARGS places the ranks itself
  [[ -n $per_node && ${MPIRUN_ARGS:-} != *--map-by* && ${MPIRUN_ARGS:-} != *-npernode* ]] && args+=(--map-by "ppr:$per_node:node")
fi
# shellcheck disable=SC2206
extra=(${MPIRUN_ARGS:-})

echo "[mpirun.sh] $np rank(s) via $("$mpirun" --version 2>&1 | head -n 1), command: $*"
exec "$mpirun" "${args[@]}" ${extra[@]+"${extra[@]}"} python -m hpc_train "$@"
