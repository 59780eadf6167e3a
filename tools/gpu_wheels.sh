#!/usr/bin/env bash
# Fetches, on a machine that reaches PyPI, the wheels that the GPU image lacks into .whl/ (in
# .gitignore), for tools/gpu_benchmark.sh to install there. The image (Python 3.12, jax 0.11,
# torch, flax, optax, orbax, absl-py, tensorboard, pyarrow, matplotlib) lacks ml_collections,
# which every config needs; Grain is optional (the input pipeline falls back without it).
#
#   bash tools/gpu_wheels.sh      # then carry ".whl" with the device call
set -euo pipefail
cd "$(dirname "$0")/.."
# ml_collections is pure Python (its needs, absl-py and PyYAML, are on the image).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 -d .whl "ml_collections==1.1.0"
ls -l .whl
