# Sourced by the templates' scripts (slurm/common.sh, slurm/prepare_media.slurm) with the job's
# arguments, after they define hpc_log: the settings given as arguments, the job's environment
# under sbatch --export=NONE, the checkout, the site's SETUP and the virtualenv (each setting is
# documented in slurm/common.sh). Leaves OVERRIDES (the config overrides) and CONFIG (or
# DEFAULT_CONFIG, or empty) set, the checkout the working folder and python on PATH.

# Settings given as arguments (NAME=value, upper case); the rest are config overrides.
OVERRIDES=()
for arg in "$@"; do
  if [[ $arg =~ ^[A-Z][A-Z0-9_]*= ]]; then export "${arg%%=*}=${arg#*=}"; else OVERRIDES+=("$arg"); fi
done
CONFIG=${CONFIG:-${DEFAULT_CONFIG:-}}
if [[ -n ${SLURM_EXPORT_ENV:-} && $SLURM_EXPORT_ENV != ALL* ]]; then  # --export=NONE / NIL / NAME=value (a site default, or asked for)
  hpc_log "sbatch --export=$SLURM_EXPORT_ENV: the submitting shell's variables did not reach this job (give settings as" \
          "arguments: sbatch slurm/<template>.slurm CONFIG=... LAUNCHER=...); config $CONFIG. This job's own steps" \
          "get its environment (SLURM_EXPORT_ENV=ALL): the virtualenv, OMP / NCCL settings, MASTER_PORT"
  export SLURM_EXPORT_ENV=ALL
fi

HPC_TRAIN_ROOT=${HPC_TRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$HPC_TRAIN_ROOT"
if [[ ! -f launch/torchrun.sh ]]; then
  echo "[hpc-train] error: $HPC_TRAIN_ROOT is not an hpc-train checkout. Fix: run sbatch from the" \
       "checkout, or set HPC_TRAIN_ROOT=/path/to/hpc-train" >&2
  exit 2
fi
python_env="${CONDA_PREFIX:-}|${VIRTUAL_ENV:-}"  # a SETUP that activates an environment changes it
if [[ -n ${SETUP:-} ]]; then  # the site's own preparation (module load, conda activate), before the virtualenv
  hpc_log "setup: $SETUP"
  set +eu  # module and conda scripts are not written for set -eu
  if [[ -f $SETUP ]]; then
    # shellcheck disable=SC1090
    source "$SETUP"
  else
    eval "$SETUP"
  fi
  done_setup=$?
  set -eu
  if ((done_setup != 0)); then
    echo "[hpc-train] error: SETUP ($SETUP) failed with exit status $done_setup (its messages above); nothing was" \
         "launched" >&2
    exit 2
  fi
fi
if [[ -n ${VENV:-} && ! -f $VENV/bin/activate ]]; then
  echo "[hpc-train] error: VENV=$VENV has no bin/activate. Fix: the folder of a virtualenv (python -m venv), or" \
       "unset VENV (a conda environment goes in SETUP: SETUP='eval \"\$(conda shell.bash hook)\"; conda activate" \
       "NAME')" >&2
  exit 2
fi
if [[ -z ${VENV:-} && $python_env == "${CONDA_PREFIX:-}|${VIRTUAL_ENV:-}" ]]; then
  VENV=$HPC_TRAIN_ROOT/.venv  # the checkout's own, when there is one (and SETUP activated no environment)
fi
if [[ -n ${VENV:-} && -f $VENV/bin/activate ]]; then
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi
command -v python >/dev/null || { echo "[hpc-train] error: no python on PATH. Fix: set VENV" >&2; exit 2; }
