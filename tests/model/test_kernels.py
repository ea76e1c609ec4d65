"""The reference kernels against the plainest possible formulas (a loop over time)."""

import pytest
import torch
import torch.nn.functional as F

from model import kernels


def naive_scan(x, dt, A, B, C, D, z, dt_bias, h):
    """Token-by-token Mamba-1 recurrence, straight from the paper's equations."""
    dt = F.softplus(dt + dt_bias[:, None])
    ys = []
    for t in range(x.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * x[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + x * D[:, None]
    return y * F.silu(z), h


def random_scan_inputs(batch=2, d=12, n=5, L=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return dict(
        x=r(batch, d, L), dt=r(batch, d, L), A=-torch.exp(r(d, n)), B=r(batch, n, L), C=r(batch, n, L),
        D=r(d), z=r(batch, d, L), dt_bias=r(d),
    ), r(batch, d, n)


@pytest.mark.parametrize("L", [1, 2, 3, 16, 37, 100])
def test_selective_scan_matches_recurrence(L):
    inputs, h0 = random_scan_inputs(L=L)
    y_ref, h_ref = naive_scan(**inputs, h=h0)
    y, h = kernels.selective_scan(**inputs, ssm_state=h0)
    # the kernel computes in float32, whatever the input dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)


def test_scan_is_stable_under_strong_decay():
    """Decays that a cumsum-of-logs formulation would overflow on (exp of hundreds)."""
    inputs, h0 = random_scan_inputs(L=200)
    inputs["dt"] = inputs["dt"].abs() * 20
    y_ref, _ = naive_scan(**inputs, h=h0)
    y, h = kernels.selective_scan(**inputs, ssm_state=h0)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_state_update_equals_one_step_scan():
    inputs, h0 = random_scan_inputs(L=1)
    y_ref, h_ref = naive_scan(**inputs, h=h0)
    state = h0.float().clone()
    y = kernels.selective_state_update(
        state, inputs["x"][..., 0], inputs["dt"][..., 0], inputs["A"], inputs["B"][..., 0], inputs["C"][..., 0],
        inputs["D"], inputs["z"][..., 0], inputs["dt_bias"],
    )
    torch.testing.assert_close(y, y_ref[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.double(), h_ref, rtol=1e-5, atol=1e-5)


def test_chunked_scan_equals_one_scan():
    inputs, h0 = random_scan_inputs(L=50)
    y_full, h_full = kernels.selective_scan(**inputs, ssm_state=h0)
    h, ys = h0, []
    for s, e in [(0, 7), (7, 8), (8, 31), (31, 50)]:
        part = {k: (v[..., s:e] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
        y, h = kernels.selective_scan(**part, ssm_state=h)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, -1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_full, rtol=1e-5, atol=1e-5)


def test_causal_conv1d_chunks_and_update_match_padded_conv():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 6, 20, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    ref = F.silu(F.conv1d(x, w[:, None], b, padding=3, groups=6)[..., :20])
    state = torch.zeros(2, 6, 4)
    y1, state = kernels.causal_conv1d(x[..., :9], w, b, state)
    y2, state = kernels.causal_conv1d(x[..., 9:15], w, b, state)
    steps = [kernels.causal_conv1d_update(x[..., t], w, b, state) for t in range(15, 20)]
    out = torch.cat([y1, y2, torch.stack(steps, -1)], -1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, x[..., -4:])


ATTENTION_PATHS = {
    "dispatch": kernels.attention,
    "cpu history + chunk": kernels._history_then_chunk,
    "sdpa lower-right (the CUDA path)": kernels._lower_right,
}


@pytest.mark.parametrize("path", ATTENTION_PATHS.values(), ids=ATTENTION_PATHS.keys())
def test_attention_with_cache_matches_full_causal_attention(path):
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kr.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), float("-inf"))
    ref = scores.softmax(-1) @ vr
    # the last 11 queries against a cache of all 30 keys
    torch.testing.assert_close(path(q[:, :, 19:], k, v), ref[:, :, 19:], rtol=1e-5, atol=1e-5)
    # one query at a time (decode)
    torch.testing.assert_close(kernels.attention(q[:, :, 9:10], k[:, :, :10], v[:, :, :10]), ref[:, :, 9:10], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CUDA attention path in bf16")
def test_attention_on_cuda_matches_float32_math():
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, 32, 144, 128, device="cuda", generator=g)
    k, v = (torch.randn(1, 8, 2000, 128, device="cuda", generator=g) for _ in range(2))
    ref = _lower_right_reference(q, k, v)
    got = kernels.attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
    assert (got - ref).abs().max() / ref.abs().max() < 1e-2


def _lower_right_reference(q, k, v):
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    lq, s = q.shape[-2], k.shape[-2]
    scores = (q @ kr.transpose(-1, -2)) / q.shape[-1] ** 0.5
    mask = torch.ones(lq, s, dtype=torch.bool, device=q.device).tril(s - lq)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vr
