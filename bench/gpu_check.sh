#!/usr/bin/env bash
# The whole device check, as one call on the GPU machine (from the repository root, with
# .whl carried; make it here first with `bash bench/gpu_wheels.sh`):
#   1. the kernel and model tests, compiled Triton on the GPU instead of the interpreter;
#   2. the benchmark (python -m bench.gpu), under 8 minutes.
# Logs and gpu.json land in $OUT (or /tmp/gpu-check when run by hand).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/model/test_triton_kernels.py tests/model/test_kernels.py \
  tests/model/test_llm_parity.py tests/model/test_ops.py tests/model/test_state.py 2>&1 | tee "$OUT/tests.log"
timeout 480 python3 -m bench.gpu --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/bench.log"
