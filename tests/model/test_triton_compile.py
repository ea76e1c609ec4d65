"""The Triton kernels compile for the GPUs this project targets (sm_90: H100 and H200),
here, without a GPU: Triton's compiler and the ptxas it ships run on any machine.

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
import json, os, re, subprocess, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import model.triton_kernels as tk

CUOBJDUMP = os.path.join(triton.__path__[0], "backends", "nvidia", "bin", "cuobjdump")

# float32 whatever the model's dtype: the SSM state, A, and attention's per-split partials
FP32_ARGS = {"A_ptr", "h_in_ptr", "h_out_ptr", "h_ptr", "part_ptr", "lse_ptr"}
TABLES = {"k_table": "*i64", "v_table": "*i64", "stride_table": "*i64", "length_table": "*i32"}

def compile_for(jit, constexprs, dtype, num_warps):
    sig = {}
    for name in jit.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_ARGS else "*" + dtype
        else:
            sig[name] = TABLES.get(name, "fp32" if name == "scale" else "i32")
    src = ASTSource(fn=jit, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:  # registers and spills, as ptxas left them
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    spilled = re.search(r"LOCAL:(\d+)", usage)
    assert spilled and spilled.group(1) == "0", f"{jit.__name__} {constexprs} {dtype} spills: {usage}"

flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True)
done = []
for dtype in ("bf16", "fp32"):
    for config in tk._selective_scan_kernel.configs:
        compile_for(tk._selective_scan_kernel.fn, {**flags, **config.kwargs, "BLOCK_N": 16}, dtype, config.num_warps)
        done.append(f"scan {config.kwargs} {dtype}")
    compile_for(tk._state_update_kernel, {**flags, "BLOCK_D": 64, "BLOCK_N": 16}, dtype, 4)
    compile_for(tk._conv1d_kernel, {"K": 4, "HAS_BIAS": True, "BLOCK_D": 64, "BLOCK_T": 64, "BLOCK_K": 4}, dtype, 4)
    compile_for(tk._conv1d_update_kernel, {"K": 4, "HAS_BIAS": True, "BLOCK_D": 256, "BLOCK_K": 4}, dtype, 4)
    precision = "ieee" if dtype == "fp32" else "tf32"
    compile_for(tk._kv_append_kernel, {"HEAD_DIM": 128}, dtype, 4)
    compile_for(tk._decode_attention_kernel, {"GROUP": 4, "BLOCK_G": 16, "HEAD_DIM": 128, "BLOCK_N": 64, "PRECISION": precision}, dtype, 4)
    for splits in (1, 128):  # one split (short histories) to 128 (up to 262k rows)
        compile_for(tk._merge_splits_kernel, {"HEAD_DIM": 128, "BLOCK_S": splits}, dtype, 4)
    done += [f"{name} {dtype}" for name in ("state update", "conv1d", "conv1d update", "kv append", "decode attention", "merge")]
print(json.dumps(done))
"""


def test_kernels_compile_for_sm90():
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ALL], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(compiled) == 2 * (5 + 6), compiled  # every scan config and each other kernel, in two dtypes
