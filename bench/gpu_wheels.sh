#!/usr/bin/env bash
# The Python packages the GPU machine lacks, as wheels for its Python 3.12, into .whl/ (git-ignored;
# a device run carries it). That machine has torch, numpy, pillow, pyarrow, fsspec, safetensors,
# huggingface-hub, scikit-image, matplotlib, psutil, pyyaml and pytest, and no network. Ray's wheel
# (79 MB) is over what a run may carry, so bench/bench_gpu.py runs the job's worker without Ray.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 2
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 importlib_metadata==8.7.0
ls -l .whl
