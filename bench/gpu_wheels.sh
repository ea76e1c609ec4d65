#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the GPU machine that its image lacks (pydantic and its
# needs, fsspec for the checkpoint store; torch, triton, transformers, safetensors and
# msgpack are there). That machine
# runs Python 3.12 and reaches no network, so they travel in the ignored folder .whl/:
#   bash bench/gpu_wheels.sh            # here, once
#   then on the GPU machine (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3 bench/gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .gitignore || echo '/.whl/' >> .gitignore
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 fsspec==2026.9.0
ls -la .whl
