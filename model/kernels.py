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
    dA = (dt.unsqueeze(-1) * A.float()).exp_()
    dBx = (dt * x.float()).unsqueeze(-1) * B.float().unsqueeze(-2)
    return dA, dBx


def _block_size(T: int) -> int:
    return max(1, math.isqrt(T))


def _scan(dA: torch.Tensor, dBx: torch.Tensor, C: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``h_t = dA_t * h_{t-1} + dBx_t`` and read out ``y_t = C_t . h_t``, in O(sqrt(T)) vector steps.

    The T positions (a multiple of ``Q = _block_size(T)``) form blocks of Q. (1) Scan inside
    every block at once from a zero state (Q steps, vectorised over blocks). (2) Carry the
    state across blocks (T/Q steps on one state). (3) For each in-block position, add the
    decayed incoming state and contract with C, never holding all T states at once. Every
    product is of factors in (0, 1], so nothing overflows the way a cumsum of logs can.
    ``dA``, ``dBx``: ``[batch, T, d_inner, d_state]``; ``C``: ``[batch, T, d_state]``;
    ``h0``: ``[batch, d_inner, d_state]``. Returns ``(y [batch, T, d_inner], h_T)``.
    """
    q = _block_size(dA.shape[1])
    # unbind, not indexing: in autograd, the backward of each index op would write a
    # gradient the size of the whole input, and the backward pass would cost O(T^1.5)
    a, b, c = (t.unflatten(1, (-1, q)).unbind(2) for t in (dA, dBx, C))

    # 1. in-block states from zero, and the decay accumulated since each block's start
    states, decays = [b[0]], [a[0]]
    for j in range(1, q):
        states.append(torch.addcmul(b[j], a[j], states[-1]))
        decays.append(a[j] * decays[-1])
    # 2. the state entering each block
    incoming, h = [], h0
    for last_state, last_decay in zip(states[-1].unbind(1), decays[-1].unbind(1)):
        incoming.append(h)
        h = torch.addcmul(last_state, last_decay, h)
    entering = torch.stack(incoming, 1)  # [batch, blocks, d, n]
    # 3. read out position j of every block
    ys = [torch.einsum("bkdn,bkn->bkd", torch.addcmul(states[j], decays[j], entering), c[j]) for j in range(q)]
    return torch.stack(ys, 2).flatten(1, 2), h


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
    L = x.shape[-1]
    pad = -L % _block_size(L)
    # Time-major inputs, so the scan walks dim 1, padded to whole blocks with identity
    # steps: dt = -inf gives decay 1 and input 0, and C = 0 reads nothing out.
    xt, dtt, Bt, Ct = (
        F.pad(t.transpose(1, 2).float(), (0, 0, 0, pad), value=v)
        for t, v in ((x, 0.0), (dt, -torch.inf), (B, 0.0), (C, 0.0))
    )
    dA, dBx = _discretize(xt, dtt, A, Bt, dt_bias)
    y, last = _scan(dA, dBx, Ct, ssm_state.float())
    return skip_and_gate(y[:, :L], xt[:, :L], D, z, x.dtype), last


def skip_and_gate(
    y: torch.Tensor, xt: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The scan's time-major ``y`` plus the skip ``D * x``, gated by ``silu(z)``, as ``[batch, d_inner, L]``."""
    if D is not None:
        y = y + xt * D.float()
    if z is not None:
        y = y * F.silu(z.transpose(1, 2).float())
    return y.transpose(1, 2).to(dtype)


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
    if lq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if lq == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if q.device.type == "cpu" and _flash_cpu is not None:
        return _history_then_chunk(q, k, v)
    return _lower_right(q, k, v)


def _lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with a lower-right causal mask. On CUDA its flash kernel takes that mask and GQA
    natively, so nothing of size ``Lq x S`` is built and K/V are not repeated per head."""
    from torch.nn.attention.bias import causal_lower_right  # imports torch._dynamo: 1.5 s, so only when used

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]), enable_gqa=True)


def append_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, caches: list) -> torch.Tensor:
    """Each row appends its new K/V to its own cache and attends over all of it.

    ``q`` is ``[batch, heads, L, head_dim]``, ``k``/``v`` ``[batch, kv_heads, L, head_dim]``,
    with one ``KVCache`` per row, so rows of different history lengths go together (one
    row per session in a decode batch).
    """
    outs = [attention(q[j : j + 1], *c.append(k[j : j + 1], v[j : j + 1])) for j, c in enumerate(caches)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# torch's CPU flash attention, which also returns the log-sum-exp that merging needs
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _history_then_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Append-time attention on CPU, in two parts merged by their log-sum-exps.

    SDPA would materialise the lower-right mask and read K/V once per query head. Instead:
    the history keys, which every new query sees whole, need no mask, and each GQA group's
    heads fold into one block of queries, so K/V are read once per KV head; the chunk's own
    keys are few and take a plain causal mask. About 1.5x faster for a short chunk over a
    long history, where this cost dominates a step.
    """
    b, h, lq, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g = h // kvh
    out_h, lse_h = _flash_cpu(q.reshape(b, kvh, g * lq, d), k[:, :, : s - lq], v[:, :, : s - lq])
    own_k, own_v = (t[:, :, s - lq :].repeat_interleave(g, dim=1) for t in (k, v))
    out_c, lse_c = _flash_cpu(q, own_k, own_v, is_causal=True)
    share = torch.sigmoid(lse_h.reshape(b, h, lq, 1) - lse_c.reshape(b, h, lq, 1))  # history's part of the mass
    return (share * out_h.reshape(b, h, lq, d) + (1 - share) * out_c).to(q.dtype)


def describe_attention(device: torch.device | str) -> str:
    if torch.device(device).type == "cpu" and _flash_cpu is not None:
        return "torch SDPA; appends as history + causal chunk on torch's CPU flash kernel"
    return "torch SDPA"
