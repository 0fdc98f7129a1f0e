# Shared by slurm/baseline.slurm, lora.slurm and qlora.slurm (sourced, not run).
#
# Every tunable is an environment variable with a default; set it on the sbatch line
# (`CONFIG=my.yaml sbatch slurm/lora.slurm`), export it before, or give it as an argument after
# the template (`sbatch slurm/lora.slurm CONFIG=my.yaml LAUNCHER=srun`: upper-case NAME=value),
# which is the way under `sbatch --export=NONE`, where the submitting shell's variables do not
# reach the job. The other arguments are config overrides:
# `sbatch -N 2 slurm/lora.slurm train.lr=1e-4 data.train=x.jsonl`.
#
#   CONFIG           recipe name or YAML file (each template sets its own default)
#   OUTPUT_DIR       where the run writes (default: the config's output_dir,
#                    results/training/<mode> in the shipped recipes; each task of a job array
#                    writes in <that>/<array job>_<task>). One run at a time: a run refuses a
#                    folder another job (or process) still writes, requeued ones included
#   LAUNCHER         torchrun (one per node, c10d rendezvous) | deepspeed (deepspeed
#                    --launcher slurm) | srun (one task per process)     (default torchrun;
#                    srun when the job asked --gpus-per-task: one rank per task)
#   NPROC_PER_NODE   processes per node (default: the GPUs SLURM gave the node, else 1)
#   MASTER_PORT      rendezvous port (default 10000 + job id % 20000)
#   HPC_TRAIN_ROOT   the hpc-train checkout (default: the directory sbatch was run from)
#   SETUP            the site's preparation, before anything runs: a command (SETUP="module load
#                    cuda/12.4") or a bash file to source (module loads, conda activate)
#   VENV             virtualenv to activate (default $HPC_TRAIN_ROOT/.venv when it exists and
#                    SETUP activated no conda / virtual environment)
#   OMP_NUM_THREADS  CPU threads per process (default: CPUs per task / processes per node)
#   NCCL_DEBUG       NCCL's log level (default WARN; INFO to debug a hang)
#   NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE, NCCL_IB_HCA
#                    unset by default; set them to your cluster's network (e.g. ib0 / eth0)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  (default 1) a dead rank ends the others instead of hanging them
#   DOCTOR           1 (default): `hpc-train doctor` checks every node of the job (one srun
#                    task each) before any rank starts, and a blocker (a FAIL row) stops the
#                    job; 0 skips it
#   PLAN             1 (default): `hpc-train plan` predicts the peak GPU memory per rank for the
#                    GPUs the job got (written to OUTPUT_DIR/plan.json) and stops the job, with
#                    the changes that would fit, when it cannot fit; 0 skips it. Skipped for
#                    train.device=cpu runs and baseline evaluations.
#   PLAN_GPU         the GPU to plan for (default auto: this node's, as torch sees it); a name
#                    from `hpc-train plan --help` when the batch shell sees no GPU
#   MAX_REQUEUES     times the job may requeue itself (default 20); each requeue also needs a
#                    checkpoint newer than the one the job began from
#   STOP_TIMEOUT     seconds torchrun's agent lets the ranks checkpoint after a SIGTERM (default 900)
#   WARNING_LEAD     seconds the time limit's warning comes before it (default 300, the templates'
#                    --signal=B:USR1@300; change both together): a checkpoint that takes more
#                    than half of it is said in the log, with a lead that would fit
#   SEQUENCE_PARALLEL  ranks that share each sample's sequence (train.sequence_parallel, DeepSpeed
#                    Ulysses; default: the config's, 1 = off). The job's ranks (nodes x processes
#                    per node) must be a multiple of it; the plan plays each rank of a group.
#
# Preemption: the templates ask for SIGUSR1 some minutes before the time limit
# (--signal=B:USR1@...), which this script passes on to the training processes (again every
# 30 s, for a rank still starting); a preemption's grace time begins with SIGTERM to the job's
# steps, which the ranks take themselves (a batch shell that gets SIGTERM passes it on too).
# They save a checkpoint at the next step boundary and exit; the job then requeues itself
# (`scontrol requeue`) and, when it runs again, resumes from that checkpoint: only when that
# checkpoint is newer than the one the job began from, at most MAX_REQUEUES times, and only
# while SLURM has the job RUNNING (as in a preemption's grace time; not once a scancel or the
# time limit is ending it). A failure after the signal ends the job FAILED
# (hpc_train/slurm_outcome.py decides).
# OUTPUT_DIR must be on a filesystem every node sees (checkpoints are written by all ranks
# and renamed by rank 0), as cluster home / project / scratch filesystems are.

set -euo pipefail

hpc_log() { echo "[$(date +%H:%M:%S)] [hpc-train] $*"; }

# The stop signals are taken from the first line on (bash would end on a USR1 it does not
# trap): one that comes while the config is read, the node checked or the memory planned
# launches nothing, and the ranks take one that comes later.
signalled=""
launched=""
resent=$SECONDS
forward_signal() {  # the batch shell got $1: pass it to the ranks, keep waiting for them
  if [[ $signalled != "$1" ]]; then
    local left
    left=$(squeue -h -j "${SLURM_JOB_ID:-0}" -o %L 2>/dev/null) || true
    hpc_log "got SIG$1 (${left:-?} left of the job's time): asking the ranks to checkpoint and stop"
  fi
  signalled=$1
  resent=$SECONDS
  [[ -n $launched ]] || return 0
  # Every job step's processes, whatever started them (torchrun, srun, DeepSpeed's srun);
  # not this batch shell.
  scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || kill "-$1" "$launched" 2>/dev/null || true
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM
stopped_before_launch() {  # the signal came (or a SIGTERM to the whole job ended a check) before any rank started
  hpc_log "SIG$signalled came before any rank started: nothing launched, nothing saved (a preemption is" \
          "SLURM's to requeue; after the time limit's warning, give the job more time: sbatch --time)"
  exit 1
}

# shellcheck source=slurm/job_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/job_env.sh" "$@"  # settings, SETUP, the virtualenv
[[ -n $CONFIG ]] || { echo "[hpc-train] error: no CONFIG (the templates set DEFAULT_CONFIG)" >&2; exit 2; }

LAUNCHER=${LAUNCHER:-torchrun}
case $LAUNCHER in
  torchrun|deepspeed|srun) ;;
  *) echo "[hpc-train] error: LAUNCHER=$LAUNCHER; use torchrun, deepspeed or srun" >&2; exit 2 ;;
esac
PER_TASK=""  # the job asked for GPUs per task: one rank a task, each task's CPUs its own
if [[ -n ${SLURM_GPUS_PER_TASK:-} ]]; then
  PER_TASK=1
  tasks=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
  if [[ ${SLURM_GPUS_PER_TASK##*:} != 1 || $tasks == *,* ]]; then  # e.g. a100:2, or 3,2 tasks on two nodes
    echo "[hpc-train] error: --gpus-per-task=$SLURM_GPUS_PER_TASK with tasks per node $tasks: each rank is one task" \
         "with one GPU, the same number on every node. Fix: --ntasks-per-node=N --gpus-per-task=1, or" \
         "--gpus-per-node=N with one task per node (the templates' own layout)" >&2
    exit 2
  fi
  NPROC_PER_NODE=${NPROC_PER_NODE:-${tasks%%[(,]*}}
  if [[ $LAUNCHER == torchrun ]]; then
    hpc_log "--gpus-per-task=$SLURM_GPUS_PER_TASK: one rank per task, started by srun (LAUNCHER=srun): torchrun's" \
            "one task per node would get one task's GPUs and CPUs for all its ranks"
    LAUNCHER=srun
  fi
fi
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
  ((NPROC_PER_NODE > 0)) || NPROC_PER_NODE=1
fi
export NPROC_PER_NODE
export MASTER_PORT=${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-9500} % 20000))}
SHARE=$NPROC_PER_NODE  # --cpus-per-task is the node's, shared by its ranks, unless the job gave each task its own
[[ -n $PER_TASK ]] && SHARE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-$SHARE} / SHARE > 0 ? ${SLURM_CPUS_PER_TASK:-$SHARE} / SHARE : 1 ))}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export PYTHONUNBUFFERED=1
# The templates' --signal=B:USR1@300 lead: a checkpoint that takes more than half of it is said.
export HPC_TRAIN_WARNING_LEAD_S=${WARNING_LEAD:-300}

[[ -n ${OUTPUT_DIR:-} ]] && OVERRIDES+=("output_dir=$OUTPUT_DIR")
[[ -n ${SEQUENCE_PARALLEL:-} ]] && OVERRIDES+=("train.sequence_parallel=$SEQUENCE_PARALLEL")
# ${a[@]+"${a[@]}"}: an empty "${a[@]}" is an error under set -u in bash < 4.4 (RHEL 7).
# Resolving the config here fails fast, with the config's own message, before any rank starts.
resolved=$(python -m hpc_train show-config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
  --get output_dir --get train.mode --get data.num_workers --get train.device --get train.sequence_parallel) || {
  [[ -z $signalled ]] || stopped_before_launch
  echo "[hpc-train] error: the config does not resolve (message above); nothing was launched" >&2
  exit 2
}
mapfile -t got <<<"$resolved"
OUTPUT_DIR=${got[0]} MODE=${got[1]} WORKERS=${got[2]} DEVICE=${got[3]} SP=${got[4]}
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then  # the tasks of a job array, given one command line, would share one folder
  OUTPUT_DIR=$OUTPUT_DIR/${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID
  OVERRIDES+=("output_dir=$OUTPUT_DIR")
  hpc_log "array task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID: its own output folder, $OUTPUT_DIR"
fi
RANKS=$((${SLURM_NNODES:-1} * NPROC_PER_NODE))
if ((RANKS % SP != 0)); then
  echo "[hpc-train] error: train.sequence_parallel=$SP does not divide the job's $RANKS ranks" \
       "(${SLURM_NNODES:-1} node(s) x $NPROC_PER_NODE); nothing was launched. Fix: ask for a multiple of $SP GPUs" \
       "(sbatch -N / --gpus-per-node) or set SEQUENCE_PARALLEL" >&2
  exit 2
fi
# Each rank is one process plus data.num_workers decoding workers: more of them than the
# node's CPUs give each rank starves the GPUs, so the workers are lowered to fit, and said.
CPUS_ON_NODE=${SLURM_CPUS_ON_NODE:-$(nproc)}
per_rank=$((CPUS_ON_NODE / NPROC_PER_NODE > 0 ? CPUS_ON_NODE / NPROC_PER_NODE : 1))
if ((WORKERS > per_rank - 1)); then
  fit=$((per_rank - 1))
  hpc_log "data.num_workers=$WORKERS lowered to $fit: $CPUS_ON_NODE CPUs on this node for $NPROC_PER_NODE rank(s)" \
          "leave $per_rank per rank (the rank and its workers). Fix: ask for $((NPROC_PER_NODE * (WORKERS + 1)))" \
          "CPUs per node (sbatch --cpus-per-task=$((SHARE == 1 ? WORKERS + 1 : NPROC_PER_NODE * (WORKERS + 1))))" \
          "to keep $WORKERS"
  OVERRIDES+=("data.num_workers=$fit")
fi
CPUS=()  # srun's --cpus-per-task, when the job asked for one
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && CPUS=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
NODES=${SLURM_NNODES:-1}
if [[ ${DOCTOR:-1} != 0 ]]; then
  # Every node, at once (one task each, its lines labelled with its node's number): one
  # node's missing GPU or unmounted output folder would otherwise fail the job later.
  on_nodes=()
  ((NODES > 1)) && on_nodes=(srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 ${CPUS[@]+"${CPUS[@]}"} --label)
  ${on_nodes[@]+"${on_nodes[@]}"} python -m hpc_train doctor "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
    --output-dir "$OUTPUT_DIR" || {
    [[ -z $signalled ]] || stopped_before_launch
    echo "[hpc-train] error: hpc-train doctor found a blocker on ${SLURM_JOB_NODELIST:-$(hostname -s)} (the FAIL" \
         "rows above$( ((NODES > 1)) && echo ", each line led by its node's number in the job"));" \
         "nothing was launched. Fix those, or set DOCTOR=0 to launch anyway" >&2
    exit 2
  }
fi
mkdir -p "$OUTPUT_DIR"

if [[ ${PLAN:-1} != 0 && $MODE != baseline && ($DEVICE != cpu || -n ${PLAN_GPU:-}) ]]; then
  planned=0
  python -m hpc_train plan "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} --gpu "${PLAN_GPU:-auto}" \
    --nodes "$NODES" --gpus-per-node "$NPROC_PER_NODE" --search off --json "$OUTPUT_DIR/plan.json" || planned=$?
  [[ -z $signalled ]] || stopped_before_launch
  if ((planned == 3)); then
    echo "[hpc-train] error: the plan above does not fit the job's GPUs; nothing was launched. Fix: one of" \
         "the changes it lists (hpc-train plan ... --gpu ${PLAN_GPU:-<gpu>} also finds the largest settings that fit), or PLAN=0 to" \
         "launch anyway" >&2
    exit 2
  elif ((planned != 0)); then
    hpc_log "warning: hpc-train plan failed (exit $planned, message above); launching without a plan"
  fi
fi
SPLIT=()  # the same CPUs shared by NPROC_PER_NODE tasks (or each task's own)
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && SPLIT=(--cpus-per-task=$((SLURM_CPUS_PER_TASK / SHARE > 0 ? SLURM_CPUS_PER_TASK / SHARE : 1)))
hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | paste -sd, -)
hpc_log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}), restart ${SLURM_RESTART_COUNT:-0}: $MODE, config $CONFIG"
hpc_log "nodes $NODES ($hosts) x $NPROC_PER_NODE process(es), launcher $LAUNCHER," \
        "master port $MASTER_PORT, OMP_NUM_THREADS $OMP_NUM_THREADS"
hpc_log "output $OUTPUT_DIR; overrides: ${OVERRIDES[*]:-(none)}"

START_STEP=$(python -m hpc_train.slurm_outcome start "$OUTPUT_DIR")  # what a requeue must go beyond

# srun is given every count explicitly: a step inherits SLURM_NTASKS from the batch job,
# and (Slurm >= 22.05) not its --cpus-per-task.
launch() {
  case $LAUNCHER in
    torchrun)
      srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 ${CPUS[@]+"${CPUS[@]}"} \
        --kill-on-bad-exit=1 launch/torchrun.sh train "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} & ;;
    deepspeed)
      launch/deepspeed.sh train "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} & ;;
    srun)
      srun --nodes="$NODES" --ntasks=$((NODES * NPROC_PER_NODE)) --ntasks-per-node="$NPROC_PER_NODE" \
        ${SPLIT[@]+"${SPLIT[@]}"} --kill-on-bad-exit=1 python -m hpc_train train "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} & ;;
  esac
  launched=$!
  while kill -0 "$launched" 2>/dev/null; do
    sleep 1 || true  # a SIGTERM to the whole job (its time limit, a scancel) ends this sleep too
    # The warning again every 30 s while the ranks run: a rank still starting (its job step
    # not yet begun, or its handler not yet in place) misses the first; one that has it
    # ignores more.
    if [[ $signalled == USR1 ]] && ((SECONDS - resent >= 30)); then forward_signal USR1; fi
  done
  status=0
  wait "$launched" || status=$?
}
[[ -z $signalled ]] || stopped_before_launch
launch

# Requeue only for progress (a checkpoint newer than the one this job began from), at most
# MAX_REQUEUES times, never a job SLURM cancelled or requeues itself; a failure ends FAILED.
job_state=$(scontrol show job "${SLURM_JOB_ID:-0}" -o 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true)
read -r action code message < <(python -m hpc_train.slurm_outcome end "$OUTPUT_DIR" --signal "$signalled" \
  --status "$status" --start-step "$START_STEP" --restarts "${SLURM_RESTART_COUNT:-0}" \
  --max-requeues "${MAX_REQUEUES:-20}" --job-state "${job_state:-}") || true  # no line: the default case below
case $action in
  requeue) hpc_log "$message"; scontrol requeue "$SLURM_JOB_ID"; exit 0 ;;
  fail) hpc_log "$message"; exit "$code" ;;
  done) ;;
  *) hpc_log "warning: no requeue decision (message above); ending with the launch step's status $status"
     ((status == 0)) || exit "$status" ;;
esac
[[ -n $signalled ]] && { hpc_log "$message"; exit 0; }
report=$OUTPUT_DIR/profile/report.json
hpc_log "done: $OUTPUT_DIR"
[[ -f $report ]] && python -m profiling.cli show "$report"
exit 0
