"""The Triton kernels compile for the GPUs this project targets (sm_90: H100 and H200;
sm_80: A100), here, without a GPU: Triton's compiler and the ptxas it ships run on any machine.

The interpreter tests check what the kernels compute; this checks that the real compiler
accepts them, at every autotune config, for float32 and bf16 models, and that none
spills registers to local memory (``cuobjdump`` reads the cubin). It runs in a
subprocess because the interpreter (set for the other tests) replaces ``triton.jit``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

COMPILE_ALL = r"""
import itertools, json, os, re, subprocess, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import model.triton_kernels as tk

CUOBJDUMP = os.path.join(triton.__path__[0], "backends", "nvidia", "bin", "cuobjdump")

# float32 whatever the model's dtype: the SSM state, A, and attention's per-split partials
FP32_ARGS = {"A_ptr", "h_in_ptr", "h_out_ptr", "h_ptr", "part_ptr", "lse_ptr"}
TABLES = {"k_table": "*i64", "v_table": "*i64", "stride_table": "*i64", "length_table": "*i32"}

def compile_for(jit, constexprs, dtype, num_warps, arch):
    sig = {}
    for name in jit.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_ARGS else "*" + dtype
        else:
            sig[name] = TABLES.get(name, "fp32" if name == "scale" else "i32")
    src = ASTSource(fn=jit, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:  # registers and spills, as ptxas left them
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    spilled = re.search(r"LOCAL:(\d+)", usage)
    assert spilled and spilled.group(1) == "0", f"{jit.__name__} {constexprs} {dtype} spills: {usage}"

flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True)
done = []
for arch, dtype in itertools.product((90, 80), ("bf16", "fp32")):  # H100/H200, and the paper's A100
    build = lambda jit, constexprs, num_warps=4: compile_for(jit, constexprs, dtype, num_warps, arch)
    for config in tk._selective_scan_kernel.configs:
        build(tk._selective_scan_kernel.fn, {**flags, **config.kwargs, "BLOCK_N": 16}, config.num_warps)
    build(tk._state_update_kernel, {**flags, "BLOCK_D": 64, "BLOCK_N": 16})
    build(tk._conv1d_kernel, {"K": 4, "HAS_BIAS": True, "BLOCK_D": 64, "BLOCK_T": 64, "BLOCK_K": 4})
    build(tk._conv1d_update_kernel, {"K": 4, "HAS_BIAS": True, "BLOCK_D": 256, "BLOCK_K": 4})
    build(tk._kv_append_kernel, {"HEAD_DIM": 128})
    precision = "ieee" if dtype == "fp32" else "tf32"
    build(tk._decode_attention_kernel, {"GROUP": 4, "BLOCK_G": 16, "HEAD_DIM": 128, "BLOCK_N": 64, "PRECISION": precision})
    for splits in (1, 128):  # one split (short histories) to the most there are
        build(tk._merge_splits_kernel, {"HEAD_DIM": 128, "BLOCK_S": splits})
    done.append(f"sm_{arch} {dtype}")
print(json.dumps(done))
"""


def test_kernels_compile_for_hopper_and_ampere():
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ALL], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    assert compiled == ["sm_90 bf16", "sm_90 fp32", "sm_80 bf16", "sm_80 fp32"]
