"""Pure-PyTorch reference kernels: the truth every faster backend is tested against.

Each Mamba op comes as a pair, like mamba-ssm's: a chunk form that starts from a recurrent
state and returns the new one (prefill and append), and a single-token form (decode).

Layouts follow mamba-ssm: ``x`` is ``[batch, d_inner, length]``, ``B``/``C`` are
``[batch, d_state, length]``, ``A`` is ``[d_inner, d_state]``, the conv state is
``[batch, d_inner, d_conv]`` (the last ``d_conv`` inputs) and the SSM state is
``[batch, d_inner, d_state]`` in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


# ----------------------------------------------------------------------------- conv1d
def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU over a chunk, continuing from ``conv_state``.

    A zero state is the same as the zero left-padding of a fresh sequence, so prefill and
    append are one code path. Returns ``(y, new_conv_state)``.
    """
    k = weight.shape[-1]
    xs = torch.cat([conv_state[..., 1:].to(x.dtype), x], dim=-1)
    y = F.conv1d(xs, weight.unsqueeze(1), bias, groups=x.shape[1])
    new_state = torch.cat([conv_state.to(x.dtype), x], dim=-1)[..., -k:]
    return F.silu(y), new_state


def causal_conv1d_update(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor
) -> torch.Tensor:
    """One decode step: ``x`` is ``[batch, d_inner]``; ``conv_state`` is updated in place."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[..., -1] = x
    y = (conv_state.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return F.silu(y).to(x.dtype)


# ------------------------------------------------------------------------ selective scan
def _discretize(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dt_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold for A, Euler for B: returns ``(exp(dt*A), dt*B*x)`` in float32.

    Shapes broadcast over a trailing ``d_state`` axis: ``x``/``dt`` are ``[..., d_inner]``,
    ``B`` is ``[..., d_state]``.
    """
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    dt = F.softplus(dt)
    dA = torch.exp(dt.unsqueeze(-1) * A.float())
    dBx = (dt * x.float()).unsqueeze(-1) * B.float().unsqueeze(-2)
    return dA, dBx


def _linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` along dim 1, in O(sqrt(T)) vector steps.

    The T positions are cut into blocks of ``Q ~ sqrt(T)``. Step one scans inside every
    block at once (Q steps, vectorised over blocks); step two carries the state across
    blocks (T/Q steps); step three adds each block's incoming state. Every product is of
    factors in (0, 1], so nothing over- or underflows the way a cumsum of logs can.
    ``a``, ``b``: ``[batch, T, d_inner, d_state]``; ``h0``: ``[batch, d_inner, d_state]``.
    """
    batch, T = a.shape[:2]
    q = max(1, math.isqrt(T))
    nblocks = -(-T // q)
    pad = nblocks * q - T
    if pad:
        a = torch.cat([a, a.new_ones(batch, pad, *a.shape[2:])], dim=1)
        b = torch.cat([b, b.new_zeros(batch, pad, *b.shape[2:])], dim=1)
    a = a.unflatten(1, (nblocks, q))
    b = b.unflatten(1, (nblocks, q))

    # 1. inclusive scan inside every block, from a zero state
    decay, state = [a[:, :, 0]], [b[:, :, 0]]
    for j in range(1, q):
        state.append(a[:, :, j] * state[-1] + b[:, :, j])
        decay.append(a[:, :, j] * decay[-1])
    # 2. the state entering each block
    block_decay, block_state = decay[-1], state[-1]
    incoming, h = [], h0
    for n in range(nblocks):
        incoming.append(h)
        h = block_decay[:, n] * h + block_state[:, n]
    # 3. local states plus the decayed incoming state
    states = torch.stack(state, 2) + torch.stack(decay, 2) * torch.stack(incoming, 1).unsqueeze(2)
    return states.flatten(1, 2)[:, :T]


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan over a chunk, continuing from ``ssm_state``.

    ``dt`` is before bias and softplus, as mamba-ssm's ``delta_softplus=True``.
    Returns ``(y [batch, d_inner, L], new_ssm_state)``.
    """
    # time-major layout so the scan walks dim 1: [batch, L, d_inner(, d_state)]
    xt, dtt, Bt, Ct = x.transpose(1, 2), dt.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)
    dA, dBx = _discretize(xt, dtt, A, Bt, dt_bias)
    states = _linear_scan(dA, dBx, ssm_state.float())
    y = torch.einsum("btdn,btn->btd", states, Ct.float())
    if D is not None:
        y = y + xt.float() * D.float()
    if z is not None:
        y = y * F.silu(z.transpose(1, 2).float())
    return y.transpose(1, 2).to(x.dtype), states[:, -1]


def selective_state_update(
    ssm_state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
) -> torch.Tensor:
    """One decode step: ``x``, ``dt``, ``z`` are ``[batch, d_inner]``; ``B``, ``C`` are
    ``[batch, d_state]``. ``ssm_state`` is updated in place. Returns ``y [batch, d_inner]``."""
    dA, dBx = _discretize(x, dt, A, B, dt_bias)
    h = dA * ssm_state.float() + dBx
    ssm_state.copy_(h)
    y = (h * C.float().unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of a chunk of queries against a cache that ends with them.

    ``q`` is ``[batch, heads, Lq, head_dim]``; ``k``/``v`` are ``[batch, kv_heads, S, head_dim]``
    with the chunk's own keys last, so query ``i`` sees keys ``0 .. S-Lq+i``
    (lower-right causal). No positional embedding: LongLLaVA's Mamba layers carry order.
    """
    lq, s = q.shape[-2], k.shape[-2]
    mask = None if lq == 1 else causal_lower_right(lq, s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
