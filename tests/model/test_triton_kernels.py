"""The Triton kernels against the pure-PyTorch reference, on random inputs.

Without a GPU they run in Triton's interpreter (set in ``tests/conftest.py``) at small
sizes; on a GPU the same tests run the compiled kernels.
"""

import pytest
import torch

from model import kernels, triton_kernels
from model.state import BatchKV, KVCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # relative to the output's largest value


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.float().abs().max().clamp_min(1e-6)
    err = (actual.float() - expected.float()).abs().max() / scale
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} over {TOLERANCE[dtype]:.0e}"


def scan_inputs(batch, d, n, L, dtype, seed=0, time_major=True):
    """Inputs laid out as the model passes them: ``x``, ``z``, ``dt`` and ``B``/``C`` are
    transposed views of time-major projections (channels contiguous), not copies."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    xz = r(batch, L, 2 * d).to(dtype)
    x, z = xz.transpose(1, 2).chunk(2, dim=1)
    dt = r(batch, L, d).to(dtype).transpose(1, 2) - 1.0
    BC = r(batch, L, 2 * n).to(dtype)
    B, C = BC.transpose(1, 2).chunk(2, dim=1)
    if not time_major:
        x, z, dt, B, C = (t.contiguous() for t in (x, z, dt, B, C))
    A = -torch.exp(r(d, n))
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=r(d), z=z, dt_bias=r(d) * 0.5), r(batch, d, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,d,n,L", [(1, 16, 16, 1), (2, 24, 16, 37), (1, 40, 5, 70), (3, 8, 8, 16)])
def test_selective_scan_matches_reference(dtype, batch, d, n, L):
    inputs, h0 = scan_inputs(batch, d, n, L, dtype)
    y_ref, h_ref = kernels.selective_scan(**inputs, ssm_state=h0)
    y, h = triton_kernels.selective_scan(**inputs, ssm_state=h0)
    assert_relative_close(y, y_ref, dtype)
    assert_relative_close(h, h_ref, torch.float32)  # the state is float32 in both
    assert h.dtype == torch.float32


def test_selective_scan_contiguous_inputs_and_optional_parts():
    inputs, h0 = scan_inputs(2, 16, 8, 20, torch.float32, time_major=False)
    for drop in ("D", "z", "dt_bias"):
        args = {**inputs, drop: None}
        y_ref, h_ref = kernels.selective_scan(**args, ssm_state=h0)
        y, h = triton_kernels.selective_scan(**args, ssm_state=h0)
        assert_relative_close(y, y_ref, torch.float32)
        assert_relative_close(h, h_ref, torch.float32)


def test_selective_scan_chunks_compose():
    """Two appends from the returned state equal one pass over the whole sequence."""
    inputs, h0 = scan_inputs(1, 16, 16, 50, torch.float32)
    y_all, h_all = triton_kernels.selective_scan(**inputs, ssm_state=h0)
    cut = lambda t, sl: t[..., sl] if t.dim() == 3 else t
    first = {k: cut(v, slice(0, 23)) for k, v in inputs.items()}
    second = {k: cut(v, slice(23, None)) for k, v in inputs.items()}
    y1, h1 = triton_kernels.selective_scan(**first, ssm_state=h0)
    y2, h2 = triton_kernels.selective_scan(**second, ssm_state=h1)
    assert_relative_close(torch.cat([y1, y2], -1), y_all, torch.float32)
    assert_relative_close(h2, h_all, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,d,n", [(1, 16, 16), (4, 200, 5)])
def test_state_update_matches_reference(dtype, batch, d, n):
    inputs, h0 = scan_inputs(batch, d, n, 1, dtype)
    step = {k: (v[..., 0].contiguous() if v.dim() == 3 else v) for k, v in inputs.items()}
    state_ref, state = h0.clone(), h0.clone()
    y_ref = kernels.selective_state_update(state_ref, **step)
    y = triton_kernels.selective_state_update(state, **step)
    assert_relative_close(y, y_ref, dtype)
    assert_relative_close(state, state_ref, torch.float32)


def test_state_update_on_a_strided_batch_of_states():
    """Batched decode passes a slice of a larger state tensor; only that slice changes."""
    inputs, _ = scan_inputs(3, 16, 8, 1, torch.float32)
    step = {k: (v[..., 0].contiguous() if v.dim() == 3 else v) for k, v in inputs.items()}
    pool = torch.randn(5, 16, 8, device=DEVICE)
    before = pool.clone()
    expected = pool[1:4].clone()
    y_ref = kernels.selective_state_update(expected, **step)
    y = triton_kernels.selective_state_update(pool[1:4], **step)
    assert_relative_close(y, y_ref, torch.float32)
    assert_relative_close(pool[1:4], expected, torch.float32)
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[4], before[4])


def conv_inputs(batch, d, k, L, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    x = r(batch, L, 2 * d).to(dtype).transpose(1, 2)[:, :d]  # a view, as the model passes it
    return x, r(d, k).to(dtype), r(d).to(dtype), r(batch, d, k).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,d,k,L", [(1, 16, 4, 1), (2, 40, 4, 3), (1, 24, 4, 70), (2, 8, 3, 17)])
def test_causal_conv1d_matches_reference(dtype, batch, d, k, L):
    x, w, bias, state = conv_inputs(batch, d, k, L, dtype)
    y_ref, s_ref = kernels.causal_conv1d(x, w, bias, state)
    y, s = triton_kernels.causal_conv1d(x, w, bias, state)
    assert_relative_close(y, y_ref, dtype)
    assert torch.equal(s, s_ref)  # the new state is a copy of inputs: exact
    y_ref, _ = kernels.causal_conv1d(x, w, None, state)
    y, _ = triton_kernels.causal_conv1d(x, w, None, state)
    assert_relative_close(y, y_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,d,k", [(1, 16, 4), (3, 300, 4), (2, 8, 3)])
def test_causal_conv1d_update_matches_reference(dtype, batch, d, k):
    x, w, bias, state = conv_inputs(batch, d, k, 1, dtype)
    x = x[..., 0].contiguous()
    state_ref = state.clone()
    y_ref = kernels.causal_conv1d_update(x, w, bias, state_ref)
    y = triton_kernels.causal_conv1d_update(x, w, bias, state)
    assert_relative_close(y, y_ref, dtype)
    assert torch.equal(state, state_ref)


def kv_sessions(lengths, kv_heads, head_dim, dtype, seed=0):
    """Caches of different lengths, two of them forks sharing one buffer (copy-on-write)."""
    g = torch.Generator().manual_seed(seed)
    caches = []
    for n in lengths:
        c = KVCache(kv_heads, head_dim, dtype, DEVICE)
        c.append(*(torch.randn(1, kv_heads, n, head_dim, generator=g).to(DEVICE, dtype) for _ in range(2)))
        caches.append(c)
    caches.append(caches[0].fork())  # same rows and buffer as session 0
    return caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_batched_decode_attention_matches_per_session_sdpa(dtype, group):
    """Sessions of different lengths (one past a split boundary, two sharing a buffer) append
    a row each and attend, for several steps, including growth past a buffer's capacity."""
    kv_heads, head_dim = 2, 16
    lengths = [5, triton_kernels.SPLIT_ROWS + 70, 64, 1]
    ours, ref = kv_sessions(lengths, kv_heads, head_dim, dtype), kv_sessions(lengths, kv_heads, head_dim, dtype)
    batch_kv = BatchKV(ours)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        q = torch.randn(len(ours), kv_heads * group, 1, head_dim, generator=g).to(DEVICE, dtype)
        k, v = (torch.randn(len(ours), kv_heads, 1, head_dim, generator=g).to(DEVICE, dtype) for _ in range(2))
        got = triton_kernels.append_and_attend(q, k, v, batch_kv)
        expected = kernels.append_and_attend(q, k, v, ref)
        assert_relative_close(got, expected, dtype)
        for a, b in zip(ours, ref):
            assert a.length == b.length
            assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    # the fork wrote its own rows: session 0 and its fork differ only in what they appended
    assert ours[0]._buf is not ours[-1]._buf


def test_chunks_and_plain_lists_take_the_reference():
    caches = kv_sessions([3], 2, 16, torch.float32)[:1]
    q, k, v = torch.randn(1, 4, 5, 16, device=DEVICE), torch.randn(1, 2, 5, 16, device=DEVICE), torch.randn(1, 2, 5, 16, device=DEVICE)
    ref_caches = kv_sessions([3], 2, 16, torch.float32)[:1]
    assert_relative_close(
        triton_kernels.append_and_attend(q, k, v, caches), kernels.append_and_attend(q, k, v, ref_caches), torch.float32
    )


def test_long_histories_use_longer_splits_not_more(monkeypatch):
    """Past MAX_SPLITS x SPLIT_ROWS rows each split grows, so the merge tile stays bounded."""
    monkeypatch.setattr(triton_kernels, "SPLIT_ROWS", 64)
    monkeypatch.setattr(triton_kernels, "MAX_SPLITS", 2)
    ours, ref = kv_sessions([300, 7], 2, 16, torch.float32), kv_sessions([300, 7], 2, 16, torch.float32)
    q = torch.randn(len(ours), 4, 1, 16, device=DEVICE)
    k, v = torch.randn(len(ours), 2, 1, 16, device=DEVICE), torch.randn(len(ours), 2, 1, 16, device=DEVICE)
    got = triton_kernels.append_and_attend(q, k, v, BatchKV(ours))
    assert_relative_close(got, kernels.append_and_attend(q, k, v, ref), torch.float32)
