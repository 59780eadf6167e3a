#!/usr/bin/env bash
# Train on a Cloud TPU VM (one host or a pod slice): create the VM unless it exists, copy this
# working tree to every worker (or clone REPO_URL), install, run the same
# `python -m influence_jax.main` on all workers and stream their logs here.
#
#   TPU_NAME=influence-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-16 PROJECT=my-project \
#     launch/tpu_vm.sh configs/default.py gs://my-bucket/runs/demo --config.loop.num_steps=20000
#   DRY_RUN=1 TPU_NAME=influence-v4 ZONE=us-central2-b \
#     launch/tpu_vm.sh configs/default.py gs://my-bucket/runs/demo   # print the commands only
#
# Environment:
#   TPU_NAME, ZONE        required
#   ACCELERATOR_TYPE      default v4-8;  RUNTIME_VERSION  default tpu-ubuntu2204-base
#   PROJECT               default: gcloud's configured project
#   SPOT=1                create the VM on spot capacity (preemptible; runs resume on restart)
#   REPO_URL, REPO_REF    clone this repository (at this branch/tag) instead of copying the tree
#   REMOTE_DIR            code folder on the workers, default influence_jax
# The workdir must be visible to every worker (gs://... or a shared disk): all workers write
# checkpoints. Workers run with INFLUENCE_JAX_AUTO_DISTRIBUTED=1, so main.py calls
# jax.distributed.initialize(), which finds the slice's workers itself. Rerunning the same command
# after a preemption resumes from the last checkpoint.
set -euo pipefail
me=launch/tpu_vm.sh
usage="usage: TPU_NAME=... ZONE=... $me CONFIG WORKDIR [overrides...] (see the header of $me)"
die() { printf '%s: %s\n' "$me" "$1" >&2; exit 2; }
join() { local IFS=,; local s="$*"; echo "${s//,/, }"; }  # "A, B, C"
(($# >= 2)) || die "needs CONFIG and WORKDIR; $usage"
config=$1
workdir=$2
shift 2
missing=()
for var in TPU_NAME ZONE; do
  [[ -n "${!var:-}" ]] || missing+=("$var")
done
((${#missing[@]} == 0)) || die "$(join "${missing[@]}") not set: the TPU VM to create or reuse \
and its zone; $usage"
accelerator=${ACCELERATOR_TYPE:-v4-8}
runtime=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
remote_dir=${REMOTE_DIR:-influence_jax}
dry=${DRY_RUN:-0}
if [[ "$dry" != [01] ]]; then
  echo "launch/tpu_vm.sh: DRY_RUN=$dry must be 0 or 1" >&2
  exit 2
fi

gflags=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gflags+=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm)

run() {  # prints the command (DRY_RUN=1) or runs it
  if [[ "$dry" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_workers() {  # runs one shell command line on every worker, output streamed here
  run "${tpu[@]}" ssh "$TPU_NAME" "${gflags[@]}" --worker=all --command="$1"
}

if [[ "$dry" == 1 ]]; then
  echo "# creates the VM unless 'gcloud compute tpus tpu-vm describe $TPU_NAME' finds it"
fi
if [[ "$dry" == 1 ]] || ! "${tpu[@]}" describe "$TPU_NAME" "${gflags[@]}" >/dev/null 2>&1; then
  create=("${tpu[@]}" create "$TPU_NAME" "${gflags[@]}" --accelerator-type="$accelerator"
    --version="$runtime")
  [[ "${SPOT:-0}" == 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

if [[ -n "${REPO_URL:-}" ]]; then
  ref=${REPO_REF:-main}
  q_dir=$(printf '%q' "$remote_dir")
  on_workers "if [ -d $q_dir/.git ]; then git -C $q_dir fetch -q origin $(printf '%q' "$ref") \
&& git -C $q_dir checkout -q FETCH_HEAD; else git clone -q --branch $(printf '%q' "$ref") \
$(printf '%q' "$REPO_URL") $q_dir; fi"
else
  # Tracked and untracked-but-not-ignored files: what `git status` shows, no venvs or runs.
  tarball=/tmp/influence_jax-$TPU_NAME.tgz
  repo=$(cd "$(dirname "$0")/.." && pwd)
  if [[ "$dry" == 1 ]]; then
    echo "(cd $(printf '%q' "$repo") && git ls-files -co --exclude-standard | tar czf $tarball -T -)"
  else
    (cd "$repo" && git ls-files -co --exclude-standard | tar czf "$tarball" -T -)
  fi
  run "${tpu[@]}" scp "$tarball" "$TPU_NAME:/tmp/influence_jax.tgz" "${gflags[@]}" --worker=all
  on_workers "mkdir -p $(printf '%q' "$remote_dir") && tar xzf /tmp/influence_jax.tgz -C \
$(printf '%q' "$remote_dir")"
fi

on_workers "cd $(printf '%q' "$remote_dir") && python3 -m pip install -q -U 'jax[tpu]' -e ."

train=(python3 -m influence_jax.main --config="$config" --workdir="$workdir" "$@")
on_workers "set -o pipefail; cd $(printf '%q' "$remote_dir") && INFLUENCE_JAX_AUTO_DISTRIBUTED=1 \
$(printf '%q ' "${train[@]}")2>&1 | tee -a /tmp/influence_jax.log"
