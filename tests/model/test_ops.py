"""Kernel backend choice: automatic, overridable, reported."""

import os
import subprocess
import sys

import pytest
import torch

from model import kernels, ops, triton_kernels


def test_auto_takes_the_reference_on_cpu_and_triton_on_cuda():
    with ops.use_kernels("auto"):
        assert ops.resolve("cpu") == "torch"
        assert ops.kernels_for("cpu") is kernels
        assert ops.resolve("cuda") == "triton"  # triton imports here, so CUDA tensors would take it
        assert "pure-PyTorch reference" in ops.describe("cpu")
        assert "Triton" in ops.describe("cuda")


def test_override_and_restore():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU, Triton runs in its interpreter
    before = ops.resolve(device)
    with ops.use_kernels("triton"):
        assert ops.kernels_for(device) is triton_kernels
        assert "Triton" in ops.describe(device)
        with ops.use_kernels("torch"):
            assert ops.resolve("cuda") == "torch"
        assert ops.resolve(device) == "triton"
    assert ops.resolve(device) == before


def test_bad_choice_is_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        ops.set_kernels("cuda")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


def test_environment_variable_sets_the_choice():
    done = run_python("from model import ops; print(ops.resolve('cpu'))", LONGLLAVA_KERNELS="torch")
    assert done.stdout.strip() == "torch", done.stderr
    done = run_python("from model import ops", LONGLLAVA_KERNELS="fast")
    assert done.returncode != 0 and "kernels must be one of" in done.stderr


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    done = run_python(
        "from model import ops; ops.set_kernels('triton'); ops.resolve('cpu')", TRITON_INTERPRET="0"
    )
    assert done.returncode != 0 and "TRITON_INTERPRET=1" in done.stderr, done.stderr
