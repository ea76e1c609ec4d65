"""The GPU benchmark script runs end to end on its smoke config, so it cannot rot between
the sessions that have a GPU. No timing is checked here; the script's parity sections are."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_smoke_run(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--steps", "6", "--peer-seconds", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["errors"] == {}, results["errors"]
    assert results["kernel_parity"]["passed"]  # the Triton kernels, in the interpreter here
    errs = results["model_parity"]["model_fp32_max_abs_err"]
    assert max(errs.values()) < 1e-4, errs
    assert results["model_parity"]["attention_append_rel_err"] < 1e-4
    for run in ("hybrid_36", "hybrid_144", "attention_only_144"):
        assert set(results[run]["at_step"]) == {"2", "5"}
        assert results[run]["decode"]["tokens_per_s"] > 0
    assert set(results["batched_decode"]) == {"1", "8", "32"}
    assert set(results["decode_attention"]) == {"1", "2"}
    assert results["capacity"]["sessions"] == 8
    assert results["checkpoint_144"]["restored_equal"] and results["checkpoint_144"]["bytes_per_step"] > 0
    assert results["targets"]["x_faster_than_tf_token"] > 0 and results["targets"]["x_faster_than_tf_chunk_min"] > 0
    peer = results["transformers"]["logit_err"]
    assert peer["ours_vs_full_pass"] < 1e-4 < peer["tf_chunk_vs_full_pass"]  # its chunked append is wrong
    # the pure-attention peer has the hybrid's parameter count (within one MLP rounding step)
    assert abs(results["attention_only_144"]["params_b"] - results["params_b"]) / results["params_b"] < 0.02
