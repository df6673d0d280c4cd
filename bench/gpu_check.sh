#!/usr/bin/env bash
# Everything a session lent a GPU machine runs there, in one call of a few minutes:
#   here, once:   bash bench/gpu_wheels.sh
#   there:        device run: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 600
# The GPU tests, then bench/bench_gpu.py's five tables; logs and the JSON record land in $OUT
# (bench/results elsewhere), written as they come, so a run cut short still returns its figures.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "install the wheels first: bash bench/gpu_wheels.sh here, then carry .whl" >&2; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
timeout "${BENCH_TIMEOUT_S:-380}" python3 bench/bench_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench-gpu.log"
