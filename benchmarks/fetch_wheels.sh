#!/usr/bin/env bash
# Download, here (with a package index), the wheels that benchmarks/gpu_run.sh
# installs on a GPU machine without one: Python 3.12, manylinux x86-64, no
# dependencies resolved (each needed one is named). The GPU image already holds
# torch, triton, transformers, accelerate, pandas, pyarrow, pytest,
# pytest-benchmark, hypothesis, py-cpuinfo and matplotlib; what it lacks:
#   liger-kernel (its GRPO loss), trl (its kernels and selective_log_softmax)
#   and trl's import-time needs missing there: datasets, dill, multiprocess.
# Measured 2026-12-06: 2.7 MiB of wheels (13 MB installed, 1.5 s for pip here); with the tracked tree
# (3 MB) about 6 MB travel of the device tool's 64 MiB. A wheel that fails to import there makes its peer
# skipped (the runner records why).
#
# Usage: benchmarks/fetch_wheels.sh [DEST]   (default .whl, which .gitignore excludes)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
wheels=(trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
mkdir -p "$dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"
du -sh "$dest"
ls "$dest"
