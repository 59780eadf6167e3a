#!/usr/bin/env bash
# Train on this machine (all local devices).
#
#   launch/local.sh configs/default.py runs/demo [--config.loop.num_steps=100 ...]
#   DRY_RUN=1 launch/local.sh configs/default.py runs/demo   # print the command only
# Environment: PYTHON (default python3), DRY_RUN (0 or 1).
set -euo pipefail
if (($# < 2)); then
  echo "launch/local.sh: needs CONFIG and WORKDIR; usage: launch/local.sh CONFIG WORKDIR \
[overrides...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
if [[ "${DRY_RUN:-0}" != [01] ]]; then
  echo "launch/local.sh: DRY_RUN=${DRY_RUN} must be 0 or 1" >&2
  exit 2
fi
cmd=("${PYTHON:-python3}" -m influence_jax.main --config="$config" --workdir="$workdir" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
