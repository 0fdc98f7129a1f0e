#!/usr/bin/env bash
# One torchrun per node, under srun: c10d rendezvous on the job's first node.
#
#   srun --ntasks-per-node=1 launch/torchrun.sh train CONFIG [key=value ...]
#
# Any hpc-train command works (`train`, `eval`, `topology --check`). Outside SLURM it runs
# a single node. Environment (each with a default):
#   NPROC_PER_NODE  processes on this node (default: GPUs SLURM gave the node, else 1)
#   MASTER_PORT     rendezvous port (default 10000 + job id % 20000: jobs sharing a node differ)
#   RDZV_HOST       rendezvous host (default: MASTER_ADDR when set, else the first host of the job);
#                   the job's first node (SLURM_NODEID 0) hosts it, whatever name the host has
#                   (an IPoIB name no node calls itself is fine)
#   MAX_RESTARTS    torchrun restarts of failed workers (default 0: a failed rank fails the job)
#   STOP_TIMEOUT    seconds torchrun's agent gives its workers to stop after a SIGTERM before it
#                   kills them (default 900; torchrun's own is 30, too short for a checkpoint):
#                   SLURM's own deadline (GraceTime, KillWait) ends the job anyway
#
# SIGUSR1 / SIGTERM reach this script (srun forwards them); it passes them to the training
# processes themselves, which checkpoint at the next step boundary. (torchrun dies on SIGUSR1,
# and on a SIGTERM of its own, as a preemption sends every process, would kill its workers 30 s
# later: it waits STOP_TIMEOUT instead.) When every worker of the node
# stopped that way, the script exits 75 (EX_TEMPFAIL: requeue), as a rank started without
# torchrun would; any other failure keeps torchrun's own status.
set -euo pipefail

gpus_on_node() {
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
  else echo 0; fi
}

nodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-0}
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
  first_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
  first_host=127.0.0.1
fi
rdzv_host=${RDZV_HOST:-${MASTER_ADDR:-$first_host}}
# torchrun would guess which node hosts the store by comparing names with rdzv_host: told instead.
if ((node_rank == 0)); then is_host=true; else is_host=false; fi
port=${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-9500} % 20000))}
nproc=${NPROC_PER_NODE:-$(gpus_on_node)}
((nproc > 0)) || nproc=1
node_name=${SLURMD_NODENAME:-$(hostname -s)}

echo "[torchrun.sh] node $node_rank of $nodes ($node_name): $nproc process(es), c10d rendezvous" \
     "$rdzv_host:$port, id ${SLURM_JOB_ID:-local}, command: $*"

# Each worker that stops for a requeue leaves a file here (torchrun reports it as a failure).
HPC_TRAIN_REQUEUE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/hpc-train-requeue.XXXXXX")
export HPC_TRAIN_REQUEUE_DIR
trap 'rm -rf "$HPC_TRAIN_REQUEUE_DIR"' EXIT

# SLURM delivers a step's signals to every process in it, torchrun's agent included, and
# torchrun dies of SIGUSR1: it must ignore it (its workers install their own handler).
(trap '' USR1; exec python -m torch.distributed.run --nnodes="$nodes" --nproc_per_node="$nproc" \
  --rdzv_backend=c10d --rdzv_endpoint="$rdzv_host:$port" --rdzv_id="${SLURM_JOB_ID:-local}" \
  --rdzv_conf="is_host=$is_host" --shutdown-timeout="${STOP_TIMEOUT:-900}" \
  --max_restarts="${MAX_RESTARTS:-0}" -m hpc_train "$@") &
agent=$!

stopping=""
forward() { stopping=$1; pkill "-$1" -P "$agent" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

while kill -0 "$agent" 2>/dev/null; do
  wait "$agent" || true  # returns early for each signal the traps take
done
# torchrun's own status (bash keeps it), not that of a wait a signal cut short as torchrun ended.
wait "$agent" && status=0 || status=$?
# Counted without a child process: srun may SIGTERM the whole step (another node's launcher
# exited first), and a killed `find` would end this script before it says why it stopped.
shopt -s nullglob
markers=("$HPC_TRAIN_REQUEUE_DIR"/rank*)
requeued=${#markers[@]}
if ((status != 0 && requeued == nproc)); then
  # torchrun reports workers that stopped on request as failed (status 1).
  echo "[torchrun.sh] node $node_rank: all $nproc worker(s) stopped for a requeue after a checkpoint" \
       "(${stopping:+SIG$stopping, }torchrun status $status); exiting 75"
  exit 75
fi
exit "$status"
