"""Triton kernels for CUDA, the Mamba-1 mixer's and the decode step's attention, with the
signatures of ``model.kernels``.

mamba-ssm's Mamba-1 prefill scan is compiled CUDA that takes no initial state, so it
cannot append onto a history; these kernels start from the recurrent state and return
the new one. Every kernel computes in float32 whatever its inputs are, reads its inputs
through strides (the projections' transposed views need no copy), and is checked against
the pure-PyTorch reference in ``tests/model/test_triton_kernels.py``, on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before this import);
``tests/model/test_triton_compile.py`` compiles each one for sm_90 without a GPU.

- ``selective_scan``: one program per (sequence, block of channels) walks the chunk in
  tiles of ``BLOCK_T`` steps; inside a tile the recurrence ``h = dA*h + dBx`` is a
  parallel ``tl.associative_scan`` over time, and the state is carried between tiles in
  registers. No ``[L, d_inner, d_state]`` tensor ever reaches memory.
- ``selective_state_update``: one decode step, in place on the state.
- ``causal_conv1d`` / ``causal_conv1d_update``: the depthwise conv with its SiLU, over a
  chunk (continuing from the conv state) and for one token. The conv cannot fuse with the
  scan: the ``x_proj`` matmul that makes dt, B and C from its output sits between them.
- ``append_and_attend``: the decode step's attention for a batch of sessions, each with its
  own K/V buffer and length. One launch appends every session's new row, one runs
  flash-decoding (each program takes one session, one KV head with its group of query
  heads, and one split of the history), one merges the splits by their log-sum-exps.
  The buffers are found through tables of their addresses (``model.state.BatchKV``), so
  no K/V is gathered or padded. Chunk appends take the reference (torch SDPA).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import kernels as reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------- helpers
@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20), with log1p(u) written out for small u, where
    # log(1 + u) in float32 would lose the digits that the reference keeps
    u = tl.exp(-tl.abs(x))
    log1p_u = tl.where(u < 1e-3, u * (1.0 - 0.5 * u), tl.log(1.0 + u))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_u)


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _linear_recurrence(a_left, b_left, a_right, b_right):
    """Compose two steps of h -> a*h + b: the combine of the associative scan."""
    return a_left * a_right, a_right * b_left + b_right


# --------------------------------------------------------------------------- selective scan
def _scan_configs() -> list[triton.Config]:
    if INTERPRETED:  # the interpreter runs each config, slowly: one is enough to check
        return [triton.Config({"BLOCK_D": 32, "BLOCK_T": 16})]
    # tiles of BLOCK_D x d_state x BLOCK_T float32s; for d_state 16 on sm_90 these take
    # 104 to 239 registers a thread and spill none (tests/model/test_triton_compile.py compiles them)
    return [
        triton.Config({"BLOCK_D": bd, "BLOCK_T": bt}, num_warps=w)
        for bd, bt, w in ((4, 32, 4), (8, 16, 4), (8, 32, 4), (16, 16, 4), (32, 16, 8))
    ]


@triton.autotune(configs=_scan_configs(), key=["d_inner", "d_state"])
@triton.jit
def _selective_scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h_in_ptr, h_out_ptr, y_ptr,
    L, d_inner, d_state,
    s_xb, s_xd, s_xt,
    s_dtb, s_dtd, s_dtt,
    s_Ad, s_An,
    s_Bb, s_Bn, s_Bt,
    s_Cb, s_Cn, s_Ct,
    s_zb, s_zd, s_zt,
    s_hb, s_hd, s_hn,
    s_yb, s_yd, s_yt,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    t_in_tile = tl.arange(0, BLOCK_T)
    d_ok, n_ok = d < d_inner, n < d_state
    dn_ok = d_ok[:, None] & n_ok[None, :]

    A = tl.load(A_ptr + d[:, None] * s_Ad + n[None, :] * s_An, mask=dn_ok, other=0.0).to(tl.float32)
    h = tl.load(h_in_ptr + b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn, mask=dn_ok, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    skip = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        skip += tl.load(D_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    is_last = (t_in_tile == BLOCK_T - 1)[None, None, :]

    for t0 in tl.range(0, L, BLOCK_T):
        t = t0 + t_in_tile
        t_ok = t < L
        dt_ok = d_ok[:, None] & t_ok[None, :]
        nt_ok = n_ok[:, None] & t_ok[None, :]
        x = tl.load(x_ptr + b * s_xb + d[:, None] * s_xd + t[None, :] * s_xt, mask=dt_ok, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + b * s_dtb + d[:, None] * s_dtd + t[None, :] * s_dtt, mask=dt_ok, other=0.0).to(tl.float32)
        Bm = tl.load(B_ptr + b * s_Bb + n[:, None] * s_Bn + t[None, :] * s_Bt, mask=nt_ok, other=0.0).to(tl.float32)
        Cm = tl.load(C_ptr + b * s_Cb + n[:, None] * s_Cn + t[None, :] * s_Ct, mask=nt_ok, other=0.0).to(tl.float32)
        # steps past L get dt = 0: decay 1 and input 0, so they leave the state as it is
        dt = tl.where(dt_ok, _softplus(dt + bias[:, None]), 0.0)

        dA = tl.exp(dt[:, None, :] * A[:, :, None])  # [BLOCK_D, BLOCK_N, BLOCK_T]
        dBx = (dt * x)[:, None, :] * Bm[None, :, :]
        decay, states = tl.associative_scan((dA, dBx), axis=2, combine_fn=_linear_recurrence)
        states = states + decay * h[:, :, None]  # the tile's states, entering state included
        y = tl.sum(states * Cm[None, :, :], axis=1)
        h = tl.sum(tl.where(is_last, states, 0.0), axis=2)

        y = y + x * skip[:, None]
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + d[:, None] * s_zd + t[None, :] * s_zt, mask=dt_ok, other=0.0).to(tl.float32)
            y = y * _silu(z)
        tl.store(y_ptr + b * s_yb + d[:, None] * s_yd + t[None, :] * s_yt, y.to(y_ptr.dtype.element_ty), mask=dt_ok)

    tl.store(h_out_ptr + b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn, h, mask=dn_ok)


def selective_scan(x, dt, A, B, C, D, z, dt_bias, ssm_state):
    """Mamba-1 selective scan over a chunk, continuing from ``ssm_state``; see ``model.kernels``."""
    batch, d_inner, L = x.shape
    d_state = A.shape[1]
    y = torch.empty(batch, d_inner, L, dtype=x.dtype, device=x.device)
    h_in = ssm_state.float()
    h_out = torch.empty_like(h_in)
    zs = z.stride() if z is not None else (0, 0, 0)
    grid = lambda meta: (batch, triton.cdiv(d_inner, meta["BLOCK_D"]))
    _selective_scan_kernel[grid](
        x, dt, A, B, C, D, z, dt_bias, h_in, h_out, y,
        L, d_inner, d_state,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *zs, *h_in.stride(), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        BLOCK_N=triton.next_power_of_2(d_state),
    )
    return y, h_out


# --------------------------------------------------------------------------- decode step
@triton.jit
def _state_update_kernel(
    h_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    d_inner, d_state,
    s_hb, s_hd, s_hn,
    s_xb, s_dtb, s_Ad, s_Bb, s_Cb, s_zb, s_yb,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_ok, n_ok = d < d_inner, n < d_state
    dn_ok = d_ok[:, None] & n_ok[None, :]
    h_ptrs = h_ptr + b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn

    h = tl.load(h_ptrs, mask=dn_ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * s_xb + d, mask=d_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_dtb + d, mask=d_ok, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + d[:, None] * s_Ad + n[None, :], mask=dn_ok, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_Bb + n, mask=n_ok, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_Cb + n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    dt = _softplus(dt)
    tl.debug_barrier()  # every read of the state precedes every write (threads may share elements)

    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h, mask=dn_ok)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_Z:
        y *= _silu(tl.load(z_ptr + b * s_zb + d, mask=d_ok, other=0.0).to(tl.float32))
    tl.store(y_ptr + b * s_yb + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)


def selective_state_update(ssm_state, x, dt, A, B, C, D, z, dt_bias):
    """One decode step, in place on the float32 ``ssm_state``; see ``model.kernels``."""
    if ssm_state.dtype != torch.float32:
        raise TypeError(f"the SSM state must be float32, got {ssm_state.dtype}")
    batch, d_inner = x.shape
    d_state = A.shape[1]
    for name, t in (("x", x), ("dt", dt), ("B", B), ("C", C), ("z", z), ("A", A)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    y = torch.empty_like(x)
    block_d = 128 if INTERPRETED else 64
    _state_update_kernel[(batch, triton.cdiv(d_inner, block_d))](
        ssm_state, x, dt, A, B, C, D, z, dt_bias, y,
        d_inner, d_state,
        *ssm_state.stride(),
        x.stride(0), dt.stride(0), A.stride(0), B.stride(0), C.stride(0), z.stride(0) if z is not None else 0, y.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(d_state),
    )
    return y


# --------------------------------------------------------------------------- conv1d
@triton.jit
def _conv1d_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, new_state_ptr, y_ptr,
    L, d_inner,
    s_xb, s_xd, s_xt,
    s_wd, s_wk,
    s_sb, s_sd, s_sk,
    s_nb, s_nd, s_nk,
    s_yb, s_yd, s_yt,
    K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``y[t] = silu(bias + sum_k w[k] * xs[t + 1 + k])`` where ``xs = state ++ x`` (K + L long)."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    d_ok = d < d_inner
    dt_ok = d_ok[:, None] & (t < L)[None, :]

    acc = tl.zeros([BLOCK_D, BLOCK_T], tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(K):
        p = t + 1 + k  # position in xs
        from_x = dt_ok & (p >= K)[None, :]
        from_state = dt_ok & (p < K)[None, :]
        v = tl.load(x_ptr + b * s_xb + d[:, None] * s_xd + (p - K)[None, :] * s_xt, mask=from_x, other=0.0)
        v += tl.load(state_ptr + b * s_sb + d[:, None] * s_sd + p[None, :] * s_sk, mask=from_state, other=0.0)
        w = tl.load(w_ptr + d * s_wd + k * s_wk, mask=d_ok, other=0.0).to(tl.float32)
        acc += w[:, None] * v.to(tl.float32)
    tl.store(y_ptr + b * s_yb + d[:, None] * s_yd + t[None, :] * s_yt, _silu(acc).to(y_ptr.dtype.element_ty), mask=dt_ok)

    if tl.program_id(2) == 0:  # the new state: the last K entries of xs
        j = tl.arange(0, BLOCK_K)
        at = L + j  # their positions in xs
        j_ok = d_ok[:, None] & (j < K)[None, :]
        last = tl.load(x_ptr + b * s_xb + d[:, None] * s_xd + (at - K)[None, :] * s_xt, mask=j_ok & (at >= K)[None, :], other=0.0)
        last += tl.load(state_ptr + b * s_sb + d[:, None] * s_sd + at[None, :] * s_sk, mask=j_ok & (at < K)[None, :], other=0.0)
        tl.store(new_state_ptr + b * s_nb + d[:, None] * s_nd + j[None, :] * s_nk, last.to(new_state_ptr.dtype.element_ty), mask=j_ok)


def causal_conv1d(x, weight, bias, conv_state):
    """Depthwise causal conv + SiLU over a chunk, continuing from ``conv_state``; see ``model.kernels``."""
    batch, d_inner, L = x.shape
    K = weight.shape[-1]
    y = torch.empty(batch, d_inner, L, dtype=x.dtype, device=x.device)
    new_state = torch.empty(batch, d_inner, K, dtype=x.dtype, device=x.device)
    block_d, block_t = (16, 16) if INTERPRETED else (64, 64)
    grid = (batch, triton.cdiv(d_inner, block_d), triton.cdiv(L, block_t))
    _conv1d_kernel[grid](
        x, weight, bias, conv_state, new_state, y,
        L, d_inner,
        *x.stride(), *weight.stride(), *conv_state.stride(), *new_state.stride(), *y.stride(),
        K=K, HAS_BIAS=bias is not None,
        BLOCK_D=block_d, BLOCK_T=block_t, BLOCK_K=triton.next_power_of_2(K),
    )
    return y, new_state


@triton.jit
def _conv1d_update_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, y_ptr,
    d_inner,
    s_xb, s_wd, s_wk, s_sb, s_sd, s_sk, s_yb,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < d_inner
    state = state_ptr + b * s_sb + d * s_sd

    # the state after the shift, as a [BLOCK_D, BLOCK_K] tile: entries 1..K-1, then x
    k = tl.arange(0, BLOCK_K)
    from_state = d_ok[:, None] & (k < K - 1)[None, :]
    from_x = d_ok[:, None] & (k == K - 1)[None, :]
    shifted = tl.load(state[:, None] + (k + 1)[None, :] * s_sk, mask=from_state, other=0.0)
    shifted += tl.load(x_ptr + b * s_xb + d[:, None] + 0 * k[None, :], mask=from_x, other=0.0)
    w = tl.load(w_ptr + d[:, None] * s_wd + k[None, :] * s_wk, mask=from_state | from_x, other=0.0).to(tl.float32)
    acc = tl.sum(w * shifted.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    tl.debug_barrier()  # every read of the state precedes every write
    tl.store(state[:, None] + k[None, :] * s_sk, shifted, mask=from_state | from_x)
    tl.store(y_ptr + b * s_yb + d, _silu(acc).to(y_ptr.dtype.element_ty), mask=d_ok)


def causal_conv1d_update(x, weight, bias, conv_state):
    """One decode step; ``conv_state`` is updated in place; see ``model.kernels``."""
    batch, d_inner = x.shape
    K = weight.shape[-1]
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    y = torch.empty_like(x)
    block_d = 128 if INTERPRETED else 256
    _conv1d_update_kernel[(batch, triton.cdiv(d_inner, block_d))](
        x, weight, bias, conv_state, y,
        d_inner,
        x.stride(0), *weight.stride(), *conv_state.stride(), y.stride(0),
        K=K, HAS_BIAS=bias is not None, BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(K),
    )
    return y


# --------------------------------------------------------------------------- decode attention
SPLIT_ROWS = 2048  # history rows per program: 144k rows make 71 splits per (session, KV head)
MAX_SPLITS = 128  # past 262k rows the splits grow instead, so the merge stays one small tile


@triton.jit
def _kv_append_kernel(
    k_new_ptr, v_new_ptr, k_table, v_table, stride_table, length_table,
    s_nb, s_nh,
    HEAD_DIM: tl.constexpr,
):
    """Write session b's new K/V row for KV head h at its last claimed row."""
    b, h = tl.program_id(0), tl.program_id(1)
    elem = k_new_ptr.dtype.element_ty
    row = tl.load(length_table + b) - 1
    at = h * tl.load(stride_table + b) + row * HEAD_DIM + tl.arange(0, HEAD_DIM)
    src = b * s_nb + h * s_nh + tl.arange(0, HEAD_DIM)
    tl.store(tl.load(k_table + b).to(tl.pointer_type(elem)) + at, tl.load(k_new_ptr + src))
    tl.store(tl.load(v_table + b).to(tl.pointer_type(elem)) + at, tl.load(v_new_ptr + src))


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_table, v_table, stride_table, length_table, part_ptr, lse_ptr,
    s_qb, s_qh, s_pb, s_ph, s_ps, s_lb, s_lh,
    scale, split_rows,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Softmax attention of one session's GROUP query heads over one split of its rows;
    writes the split's normalised output and log-sum-exp (-inf for an empty split)."""
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    elem = q_ptr.dtype.element_ty
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    g_ok = g < GROUP
    heads = kv_head * GROUP + g  # query head i reads KV head i // GROUP, as SDPA's enable_gqa
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)

    head_offset = kv_head * tl.load(stride_table + b)
    k_base = tl.load(k_table + b).to(tl.pointer_type(elem)) + head_offset
    v_base = tl.load(v_table + b).to(tl.pointer_type(elem)) + head_offset
    start = split * split_rows
    end = tl.minimum(start + split_rows, tl.load(length_table + b))

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for r0 in tl.range(start, end, BLOCK_N):
        r = r0 + tl.arange(0, BLOCK_N)
        r_ok = (r < end)[:, None]
        k = tl.load(k_base + r[:, None] * HEAD_DIM + d[None, :], mask=r_ok, other=0.0)
        # in float32 (tf32 for half-precision models: exact for bf16 inputs, and Triton's
        # interpreter cannot multiply bf16 matrices)
        scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION) * scale
        scores = tl.where((r < end)[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + r[:, None] * HEAD_DIM + d[None, :], mask=r_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        m = m_new

    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(part_ptr + b * s_pb + heads[:, None] * s_ph + split * s_ps + d[None, :], out, mask=g_ok[:, None])
    tl.store(lse_ptr + b * s_lb + heads * s_lh + split, lse, mask=g_ok)


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr, n_splits,
    s_pb, s_ph, s_ps, s_lb, s_lh, s_ob, s_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b, h = tl.program_id(0), tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    sp_ok = sp < n_splits
    lse = tl.load(lse_ptr + b * s_lb + h * s_lh + sp, mask=sp_ok, other=float("-inf"))
    weight = tl.exp(lse - tl.max(lse, axis=0))  # split 0 is never empty, so the max is finite
    weight = weight / tl.sum(weight, axis=0)
    d = tl.arange(0, HEAD_DIM)
    part = tl.load(part_ptr + b * s_pb + h * s_ph + sp[:, None] * s_ps + d[None, :], mask=sp_ok[:, None], other=0.0)
    out = tl.sum(weight[:, None] * part, axis=0)
    tl.store(out_ptr + b * s_ob + h * s_oh + d, out.to(out_ptr.dtype.element_ty))


def append_and_attend(q, k, v, caches):
    """One decode token per session of a ``BatchKV``; anything else takes the reference."""
    batch, heads, L, head_dim = q.shape
    if L != 1 or not hasattr(caches, "claim_one") or head_dim < 16 or head_dim & (head_dim - 1):
        return reference.append_and_attend(q, k, v, caches)  # tl.dot wants a power-of-2 head_dim >= 16
    kv_heads = k.shape[1]
    group = heads // kv_heads
    tables = caches.claim_one()
    k1, v1 = k[:, :, 0].contiguous(), v[:, :, 0].contiguous()  # [batch, kv_heads, head_dim]
    _kv_append_kernel[(batch, kv_heads)](
        k1, v1, tables["k"], tables["v"], tables["head_stride"], tables["length"],
        k1.stride(0), k1.stride(1), HEAD_DIM=head_dim,
    )
    longest = max(c.length for c in caches)
    split_rows = max(SPLIT_ROWS, triton.cdiv(longest, MAX_SPLITS * 64) * 64)
    n_splits = triton.cdiv(longest, split_rows)
    q1 = q[:, :, 0].contiguous()  # [batch, heads, head_dim]
    part = torch.empty(batch, heads, n_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, n_splits, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(batch, kv_heads, n_splits)](
        q1, tables["k"], tables["v"], tables["head_stride"], tables["length"], part, lse,
        q1.stride(0), q1.stride(1), part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        head_dim**-0.5, split_rows,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=64,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    _merge_splits_kernel[(batch, heads)](
        part, lse, out, n_splits,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(n_splits),
    )
    return out.unsqueeze(2)
