#!/usr/bin/env bash
# A real SLURM on this one machine: munged, slurmctld and N slurmd daemons ("nodes"
# slnode1..slnodeN, all on 127.0.0.1), from the distribution's packages. For the tests, and
# for trying a template before queueing it on a cluster:
#
#   launch/local-slurm.sh start [--nodes 2] [--cpus 8] [--gpus 0] [--mem 16000]
#   . /tmp/hpc-train-local-slurm/env.sh          # SLURM_CONF for sbatch / squeue / scontrol
#   sbatch -N 2 slurm/lora.slurm ...
#   launch/local-slurm.sh status
#   launch/local-slurm.sh stop [--purge]          # --purge: also state, logs and /etc/hosts lines
#
# Idempotent: `start` on a running cluster of the same shape only prints its env; `stop`
# stops only the daemons this script started (pid files under LOCAL_SLURM_BASE, checked
# against their command lines). Needs root: slurmd runs jobs, and node names go to
# /etc/hosts. `--gpus G` declares G fake GPUs per node (character devices like /dev/null),
# so GPU requests are scheduled as on a cluster while the jobs compute on the CPU.
#
# Environment: LOCAL_SLURM_BASE (default /tmp/hpc-train-local-slurm), LOCAL_SLURM_PORT
# (slurmctld's port, default 16917; the nodes use the next ones).
set -euo pipefail

BASE=${LOCAL_SLURM_BASE:-/tmp/hpc-train-local-slurm}
CTLD_PORT=${LOCAL_SLURM_PORT:-16917}
PREFIX=slnode
TAG="# hpc-train-local-slurm $BASE"
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "local-slurm: $*"; }
die() { echo "local-slurm: error: $*" >&2; exit 1; }

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

alive() {  # alive PIDFILE: the process in PIDFILE runs, is ours, and is not a zombie
  local pid
  [[ -f $1 ]] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ -n $pid && -d /proc/$pid ]] || return 1
  grep -qF "$BASE" "/proc/$pid/cmdline" 2>/dev/null || return 1
  [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged mungekey; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]}; install the packages ${PACKAGES[*]} (or your distribution's slurm and munge)"
  say "installing ${PACKAGES[*]}"
  # The packages' scripts would start system-wide daemons; a policy-rc.d that says no keeps them off.
  local policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when the install fails: never leave it behind
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  return 0
}

write_conf() {  # write_conf NODES CPUS GPUS MEM
  local nodes=$1 cpus=$2 gpus=$3 mem=$4 host
  host=$(hostname -s)
  local gres_line="" gres_types=""
  if ((gpus > 0)); then
    gres_types="GresTypes=gpu"
    gres_line="Gres=gpu:$gpus"
    mkdir -p "$BASE/fakedev"
    for ((i = 0; i < gpus; i++)); do
      [[ -e $BASE/fakedev/nvidia$i ]] || mknod "$BASE/fakedev/nvidia$i" c 1 3
    done
    echo "NodeName=${PREFIX}[1-$nodes] Name=gpu File=$BASE/fakedev/nvidia[0-$((gpus - 1))]" >"$BASE/etc/gres.conf"
  else
    rm -f "$BASE/etc/gres.conf"
  fi
  cat >"$BASE/etc/slurm.conf" <<EOF
# Written by launch/local-slurm.sh: $nodes nodes x $cpus CPUs${gpus:+ x $gpus fake GPUs} on $host.
ClusterName=hpctrainlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~11 s instead of 121 s
AuthInfo=socket=$BASE/run/munge.socket,cred_expire=10
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/slurmd-%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
# refuse at submission what the partition can never run (most production clusters do)
EnforcePartLimits=ALL
MinJobAge=600
KillWait=10
InactiveLimit=0
$gres_types
NodeName=${PREFIX}[1-$nodes] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((CTLD_PORT + 1))-$((CTLD_PORT + nodes))] CPUs=$cpus RealMemory=$mem $gres_line State=UNKNOWN
# Preemption as clusters set it up: a job in partition urgent takes what it needs from debug's
# jobs, which get SIGTERM and GraceTime seconds to checkpoint before SLURM requeues them.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2
EOF
}

hosts_lines() {  # node names must resolve (MASTER_ADDR is the first node's name)
  local nodes=$1
  for ((i = 1; i <= nodes; i++)); do
    grep -q "[[:space:]]$PREFIX$i[[:space:]]*$TAG\$" /etc/hosts 2>/dev/null \
      || echo "127.0.0.1 $PREFIX$i $TAG" >>/etc/hosts
  done
}

wait_idle() {  # wait_idle NODES SINCE: every node registered after SINCE and idle
  local nodes=$1 deadline=$((SECONDS + 60)) idle
  while ((SECONDS < deadline)); do
    idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 == "idle"' | sort -u | wc -l)
    ((idle >= nodes)) && return 0
    sleep 0.3
  done
  sinfo -N 2>&1 || true
  tail -n 20 "$BASE"/log/*.log >&2 || true
  die "the nodes did not become idle within 60 s (logs above, all under $BASE/log)"
}

start() {
  local nodes=2 cpus=8 gpus=0 mem=16000
  while (($#)); do
    case $1 in
      --nodes) nodes=$2; shift 2 ;;
      --cpus) cpus=$2; shift 2 ;;
      --gpus) gpus=$2; shift 2 ;;
      --mem) mem=$2; shift 2 ;;
      -h|--help) usage ;;
      *) die "unknown option $1 (see --help)" ;;
    esac
  done
  [[ $(id -u) == 0 ]] || die "needs root (slurmd runs the jobs, node names go to /etc/hosts). Fix: run it as root in a VM or container"
  local shape="$nodes $cpus $gpus $mem"
  if alive "$BASE/run/slurmctld.pid"; then
    [[ $(cat "$BASE/shape" 2>/dev/null) == "$shape" ]] \
      || die "already running with nodes/cpus/gpus/mem $(cat "$BASE/shape" 2>/dev/null); stop it first: $0 stop"
    say "already running ($nodes nodes)"
    cat "$BASE/env.sh"
    return 0
  fi
  install_packages
  # Root runs what slurm.conf says: a base another user could write to would be theirs to command.
  if [[ -e $BASE ]]; then
    [[ $(stat -c %u "$BASE") == 0 && ! -L $BASE ]] || die "$BASE exists and is not root's own folder; remove it or set LOCAL_SLURM_BASE"
    [[ $(( 0$(stat -c %a "$BASE") & 022 )) == 0 ]] || die "$BASE is writable by others; remove it or set LOCAL_SLURM_BASE"
  fi
  mkdir -p -m 755 "$BASE"
  mkdir -p "$BASE"/{etc,run,log,state/ctld,munge}
  chmod 700 "$BASE/munge"
  for ((i = 1; i <= nodes; i++)); do mkdir -p "$BASE/state/slurmd-$PREFIX$i"; done
  [[ -f $BASE/munge/munge.key ]] || mungekey --create --keyfile="$BASE/munge/munge.key"
  chmod 400 "$BASE/munge/munge.key"
  if ! alive "$BASE/run/munged.pid"; then
    munged --key-file="$BASE/munge/munge.key" --socket="$BASE/run/munge.socket" \
      --pid-file="$BASE/run/munged.pid" --log-file="$BASE/log/munged.log" \
      --seed-file="$BASE/munge/munged.seed" </dev/null >>"$BASE/log/munged.log" 2>&1
  fi
  write_conf "$nodes" "$cpus" "$gpus" "$mem"
  echo "$shape" >"$BASE/shape"
  echo "export SLURM_CONF=$BASE/etc/slurm.conf" >"$BASE/env.sh"
  hosts_lines "$nodes"
  export SLURM_CONF=$BASE/etc/slurm.conf
  # A fresh controller state: a kept one reports nodes idle before their slurmd is back.
  rm -rf "$BASE/state/ctld" && mkdir -p "$BASE/state/ctld"
  # Daemons get no terminal and no inherited pipes: a caller capturing output must not hang.
  slurmctld -f "$SLURM_CONF" </dev/null >>"$BASE/log/slurmctld.out" 2>&1
  for ((i = 1; i <= nodes; i++)); do
    # a node daemon left from an earlier start would keep the earlier configuration
    if alive "$BASE/run/slurmd-$PREFIX$i.pid"; then kill "$(cat "$BASE/run/slurmd-$PREFIX$i.pid")"; sleep 1; fi
    slurmd -f "$SLURM_CONF" -N "$PREFIX$i" </dev/null >>"$BASE/log/slurmd.out" 2>&1
  done
  wait_idle "$nodes"
  say "up: $nodes nodes ($PREFIX[1-$nodes]) x $cpus CPUs$( ((gpus)) && echo " x $gpus fake GPUs"), partitions debug and urgent (which preempts debug)"
  cat "$BASE/env.sh"
}

stop() {
  local purge=0
  [[ ${1:-} == --purge ]] && purge=1
  if [[ -f $BASE/etc/slurm.conf ]] && alive "$BASE/run/slurmctld.pid"; then
    SLURM_CONF=$BASE/etc/slurm.conf scancel --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  local pidfile pids=()
  for pidfile in "$BASE"/run/slurmd-*.pid "$BASE/run/slurmctld.pid" "$BASE/run/munged.pid"; do
    if alive "$pidfile"; then
      pids+=("$(cat "$pidfile")")
      kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
  done
  local deadline=$((SECONDS + 20)) pid
  for pid in "${pids[@]}"; do
    while [[ -d /proc/$pid && $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] && ((SECONDS < deadline)); do
      sleep 0.2
    done
    [[ -d /proc/$pid && $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] && kill -9 "$pid" 2>/dev/null || true
  done
  rm -f "$BASE"/run/*.pid
  say "stopped ${#pids[@]} daemons"
  if ((purge)); then
    if [[ -w /etc/hosts ]]; then
      grep -vF "$TAG" /etc/hosts >/etc/hosts.local-slurm.tmp || true
      cat /etc/hosts.local-slurm.tmp >/etc/hosts && rm -f /etc/hosts.local-slurm.tmp
    fi
    rm -rf "$BASE"
    say "purged $BASE and its /etc/hosts lines"
  fi
}

status() {
  if alive "$BASE/run/slurmctld.pid"; then
    SLURM_CONF=$BASE/etc/slurm.conf sinfo -N -o '%N %T %c %G'
    SLURM_CONF=$BASE/etc/slurm.conf squeue
  else
    say "not running (base $BASE)"
    return 3
  fi
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  status) status ;;
  env) cat "$BASE/env.sh" ;;
  -h|--help|help) usage ;;
  *) usage 2 >&2 ;;
esac
