#!/usr/bin/env bash
# The whole device check, as one call on the GPU machine (from the repository root, with
# .whl carried; make it here first with `bash bench/gpu_wheels.sh`):
# the benchmark, whose first sections check the compiled Triton kernels and the model on the
# GPU against the references (the same checks the CPU tests make in Triton's interpreter).
# One device call may run 10 minutes, and a lease has 15 minutes all told.
# Logs and gpu.json land in $OUT (or /tmp/gpu-check when run by hand).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
timeout 500 python3 -m bench.gpu --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/bench.log"
