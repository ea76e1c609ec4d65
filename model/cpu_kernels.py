"""The selective scan with its backward, in C++ for training on the CPU: an optional accelerator.

The reference scan (``model.kernels``) is a blocked scan of whole-tensor PyTorch ops over
``[batch, positions, d_inner, d_state]``; its autograd graph walks those tensors some
dozens of times, and on a CPU that is most of a training step. This is the same
recurrence as a plain loop over positions, the way mamba-ssm's CUDA kernel runs it:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        y_t = C_t . h_t

The forward keeps only ``h_T``; the backward recomputes one row's states, then walks the
positions backwards carrying ``dL/dh``. The inner loops run over ``d_inner``, which is
contiguous in every tensor, so the compiler vectorises them (exp included).

``torch.utils.cpp_extension`` compiles it at first use (about 30 s, once per machine: the
build is cached). Where no compiler works, ``load()`` says why and the training path keeps
the reference (``model.ops.training_kernels``). The conv is the reference's: it is cheap.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
import torch.nn.functional as F

from .kernels import causal_conv1d, skip_and_gate

__all__ = ["causal_conv1d", "selective_scan", "load"]
log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <cmath>
#include <vector>

// Layouts: delta, u [b, T, d]; At [n, d]; B, C [b, T, n]; states [b, n, d]; all contiguous.

template <typename F>
void scan_forward(const F *__restrict__ delta, const F *__restrict__ u, const F *__restrict__ At,
                  const F *__restrict__ B, const F *__restrict__ C, F *__restrict__ y, F *__restrict__ h,
                  int64_t nb, int64_t T, int64_t D, int64_t N) {
  for (int64_t b = 0; b < nb; ++b, h += N * D)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = b * T + t;
      const F *s = delta + row * D, *x = u + row * D;
      F *yt = y + row * D;
      for (int64_t n = 0; n < N; ++n) {
        const F bn = B[row * N + n], cn = C[row * N + n], *an = At + n * D;
        F *hn = h + n * D;
        for (int64_t d = 0; d < D; ++d) {
          hn[d] = std::exp(s[d] * an[d]) * hn[d] + s[d] * x[d] * bn;
          yt[d] += hn[d] * cn;
        }
      }
    }
}

template <typename F>
void scan_backward(const F *__restrict__ delta, const F *__restrict__ u, const F *__restrict__ At,
                   const F *__restrict__ B, const F *__restrict__ C, const F *__restrict__ h0,
                   const F *__restrict__ gy, F *__restrict__ g, F *__restrict__ gdelta, F *__restrict__ gu,
                   F *__restrict__ gA, F *__restrict__ gB, F *__restrict__ gC,
                   int64_t nb, int64_t T, int64_t D, int64_t N) {
  std::vector<F> hs((T + 1) * N * D);  // one row's states: hs[t + 1] is h_t, hs[0] is h0
  for (int64_t b = 0; b < nb; ++b, h0 += N * D, g += N * D) {
    std::copy(h0, h0 + N * D, hs.begin());
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = b * T + t;
      const F *s = delta + row * D, *x = u + row * D;
      for (int64_t n = 0; n < N; ++n) {
        const F bn = B[row * N + n], *an = At + n * D, *hp = &hs[(t * N + n) * D];
        F *hn = &hs[((t + 1) * N + n) * D];
        for (int64_t d = 0; d < D; ++d) hn[d] = std::exp(s[d] * an[d]) * hp[d] + s[d] * x[d] * bn;
      }
    }
    for (int64_t t = T - 1; t >= 0; --t) {  // g is dL/dh_t from the positions after t
      const int64_t row = b * T + t;
      const F *s = delta + row * D, *x = u + row * D, *gyt = gy + row * D;
      F *gs = gdelta + row * D, *gx = gu + row * D;
      for (int64_t n = 0; n < N; ++n) {
        const F bn = B[row * N + n], cn = C[row * N + n], *an = At + n * D;
        const F *hp = &hs[(t * N + n) * D], *ht = &hs[((t + 1) * N + n) * D];
        F *gn = g + n * D, *gan = gA + n * D, gbn = 0, gcn = 0;
        for (int64_t d = 0; d < D; ++d) {
          const F gh = gn[d] + gyt[d] * cn;  // the whole dL/dh_t
          const F decay = std::exp(s[d] * an[d]);
          const F gz = gh * hp[d] * decay;  // dL/d(delta_t * A)
          gcn += gyt[d] * ht[d];
          gbn += gh * s[d] * x[d];
          gs[d] += gz * an[d] + gh * x[d] * bn;
          gx[d] += gh * s[d] * bn;
          gan[d] += gz * s[d];
          gn[d] = gh * decay;
        }
        gB[row * N + n] = gbn;
        gC[row * N + n] = gcn;
      }
    }
  }
}

std::vector<torch::Tensor> forward(torch::Tensor delta, torch::Tensor u, torch::Tensor At,
                                   torch::Tensor B, torch::Tensor C, torch::Tensor h0) {
  auto y = torch::zeros_like(delta);
  auto h = h0.clone();
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "scan_forward", [&] {
    scan_forward<scalar_t>(delta.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), At.data_ptr<scalar_t>(),
                           B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                           h.data_ptr<scalar_t>(), delta.size(0), delta.size(1), delta.size(2), At.size(0));
  });
  return {y, h};
}

std::vector<torch::Tensor> backward(torch::Tensor delta, torch::Tensor u, torch::Tensor At,
                                    torch::Tensor B, torch::Tensor C, torch::Tensor h0,
                                    torch::Tensor gy, torch::Tensor ghT) {
  auto g = ghT.clone();  // ends as dL/dh0
  auto gdelta = torch::zeros_like(delta), gu = torch::zeros_like(u), gA = torch::zeros_like(At);
  auto gB = torch::zeros_like(B), gC = torch::zeros_like(C);
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "scan_backward", [&] {
    scan_backward<scalar_t>(delta.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), At.data_ptr<scalar_t>(),
                            B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                            gy.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), gdelta.data_ptr<scalar_t>(),
                            gu.data_ptr<scalar_t>(), gA.data_ptr<scalar_t>(), gB.data_ptr<scalar_t>(),
                            gC.data_ptr<scalar_t>(), delta.size(0), delta.size(1), delta.size(2), At.size(0));
  });
  return {gdelta, gu, gA, gB, gC, g};
}
"""


@functools.cache
def load() -> ModuleType | str:
    """The compiled extension, or why it cannot be built here."""
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline("longllava_cpu_scan", cpp_sources=_SOURCE, functions=["forward", "backward"],
                           extra_cflags=["-O3", "-ffast-math", "-march=native"])
    except Exception as e:  # noqa: BLE001 - a missing compiler or ninja shows as several error types
        reason = f"the C++ scan does not build here ({type(e).__name__}: {str(e).strip()[:300]})"
        log.warning("%s; training keeps the reference scan", reason)
        return reason


class _Scan(torch.autograd.Function):
    """``(y, h_T)`` of the recurrence, from ``delta, u [b, T, d]``, ``A [d, n]``,
    ``B, C [b, T, n]`` and ``h0 [b, d, n]``, all float32 or all float64."""

    @staticmethod
    def forward(ctx, delta, u, A, B, C, h0):
        inputs = [t.contiguous() for t in (delta, u, A.t(), B, C, h0.transpose(1, 2))]
        ctx.save_for_backward(*inputs)
        y, h = load().forward(*inputs)
        return y, h.transpose(1, 2)

    @staticmethod
    def backward(ctx, gy, gh):
        inputs = ctx.saved_tensors
        gy = torch.zeros_like(inputs[0]) if gy is None else gy.contiguous()
        gh = torch.zeros_like(inputs[-1]) if gh is None else gh.transpose(1, 2).contiguous()
        gdelta, gu, gA, gB, gC, gh0 = load().backward(*inputs, gy, gh)
        return gdelta, gu, gA.t(), gB, gC, gh0.transpose(1, 2)


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
    """``model.kernels.selective_scan``'s contract, on the C++ recurrence."""
    xt, dtt, Bt, Ct = (t.transpose(1, 2).float() for t in (x, dt, B, C))
    delta = F.softplus(dtt if dt_bias is None else dtt + dt_bias.float())
    y, last = _Scan.apply(delta, xt, A.to(delta.dtype), Bt, Ct, ssm_state.to(delta.dtype))
    return skip_and_gate(y, xt, D, z, x.dtype), last
