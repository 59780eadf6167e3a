#!/usr/bin/env bash
# Train on several GPU hosts, one process per host (each process drives all GPUs of its host).
#
# Under SLURM, one task per node (the coordinator is the job's first node):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
#     launch/gpu_multihost.sh configs/default.py /shared/runs/demo --config.loop.num_steps=20000
# Over plain ssh from a login machine (same code path and Python environment on every host):
#   HOSTS="gpu0 gpu1" REMOTE_DIR=/shared/influence_jax \
#     launch/gpu_multihost.sh configs/default.py /shared/runs/demo
# By hand on each host (process ids 0..N-1, the same coordinator everywhere):
#   COORDINATOR=gpu0:1234 NUM_PROCESSES=2 PROCESS_ID=0 launch/gpu_multihost.sh CONFIG WORKDIR
# Print the commands only: DRY_RUN=1 in front of any of these.
#
# Environment: PORT (coordinator port, default 1234), PYTHON (default python3). The workdir must
# be on storage every host sees: all processes write checkpoints. Rerunning the same command after
# a failure resumes from the last checkpoint.
set -euo pipefail
me=launch/gpu_multihost.sh
usage="usage: $me CONFIG WORKDIR [overrides...] (see the header of $me)"
die() { printf '%s: %s\n' "$me" "$1" >&2; exit 2; }
join() { local IFS=,; local s="$*"; echo "${s//,/, }"; }  # "A, B, C"
(($# >= 2)) || die "needs CONFIG and WORKDIR; $usage"
config=$1
workdir=$2
shift 2
port=${PORT:-1234}
python=${PYTHON:-python3}
dry=${DRY_RUN:-0}
if [[ "$dry" != [01] ]]; then
  echo "launch/gpu_multihost.sh: DRY_RUN=$dry must be 0 or 1" >&2
  exit 2
fi
train=("$python" -m influence_jax.main --config="$config" --workdir="$workdir" "$@")

first_host() {  # first host of a SLURM node list such as "gpu[07-09,12],cpu3"
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1" | head -n 1
  else
    local first=${1%%,*}
    if [[ "$1" =~ ^([^,\[]+)\[([0-9]+) ]]; then first=${BASH_REMATCH[1]}${BASH_REMATCH[2]}; fi
    echo "$first"
  fi
}

launch_here() {  # $1 coordinator, $2 process count, $3 process id
  local env=(JAX_COORDINATOR_ADDRESS="$1" JAX_NUM_PROCESSES="$2" JAX_PROCESS_ID="$3")
  if [[ "$dry" == 1 ]]; then
    printf '%q ' env "${env[@]}" "${train[@]}"; echo
  else
    exec env "${env[@]}" "${train[@]}"
  fi
}

if [[ -n "${HOSTS:-}" ]]; then
  read -r -a hosts <<<"$HOSTS"
  remote_dir=${REMOTE_DIR:-$PWD}
  pids=()
  for i in "${!hosts[@]}"; do
    remote="cd $(printf '%q' "$remote_dir") && $(printf '%q ' env \
      JAX_COORDINATOR_ADDRESS="${hosts[0]}:$port" JAX_NUM_PROCESSES="${#hosts[@]}" \
      JAX_PROCESS_ID="$i" "${train[@]}")"
    if [[ "$dry" == 1 ]]; then
      printf '%q ' ssh "${hosts[$i]}" "$remote"; echo
    else
      ssh "${hosts[$i]}" "$remote" 2>&1 | sed "s/^/[${hosts[$i]}] /" &
      pids+=($!)
    fi
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  exit "$status"
elif [[ -n "${SLURM_PROCID:-}" ]]; then
  nodes=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
  [[ -n "$nodes" && -n "${SLURM_NTASKS:-}" ]] || die "SLURM_PROCID is set but \
SLURM_JOB_NODELIST or SLURM_NTASKS is not: start one task per node with srun (see the header)"
  launch_here "$(first_host "$nodes"):$port" "$SLURM_NTASKS" "$SLURM_PROCID"
else
  missing=()
  for var in COORDINATOR NUM_PROCESSES PROCESS_ID; do
    [[ -n "${!var:-}" ]] || missing+=("$var")
  done
  if ((${#missing[@]})); then
    die "no hosts to launch on: $(join "${missing[@]}") not set (and neither HOSTS nor SLURM).
Launch in one of three ways:
  HOSTS=\"gpu0 gpu1\" $me CONFIG WORKDIR      over ssh, from a login machine
  srun --nodes=2 --ntasks-per-node=1 $me CONFIG WORKDIR      under SLURM
  COORDINATOR=gpu0:1234 NUM_PROCESSES=2 PROCESS_ID=0 $me CONFIG WORKDIR      by hand on each host"
  fi
  launch_here "$COORDINATOR" "$NUM_PROCESSES" "$PROCESS_ID"
fi
