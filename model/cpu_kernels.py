"""The selective scan with its backward, in C++ for training on the CPU: an optional accelerator.

The reference scan (``model.kernels``) is a blocked scan of whole-tensor PyTorch ops over
``[batch, positions, d_inner, d_state]``; its autograd graph walks those tensors some
dozens of times, and on a CPU that is most of a training step. This is the same
recurrence as a plain loop over positions, the way mamba-ssm's CUDA kernel runs it:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        y_t = C_t . h_t

The forward keeps only ``h_T``; the backward recomputes one row's states, then walks the
positions backwards carrying ``dL/dh``. The inner loops run over ``d_inner``, which is
contiguous in every tensor, so the compiler vectorises them (exp included).

``torch.utils.cpp_extension`` compiles it at first use with the system's C++ compiler and
ninja (about 30 s), for this CPU (``-march=native``), and caches the build under
``~/.cache/torch_extensions`` in a name that hashes the source, the flags, torch's version
and the CPU's flags, so that no build meets a CPU or a source it was not made for. Where it
does not build, ``load()`` says why and the training path keeps the reference
(``model.ops.training_kernels``). The conv is the reference's: it is cheap.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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

// What the loops index: contiguous CPU tensors of one dtype, of agreeing sizes.
void check(const torch::Tensor &delta, const torch::Tensor &u, const torch::Tensor &At,
           const torch::Tensor &B, const torch::Tensor &C, const torch::Tensor &h) {
  for (const auto &t : {delta, u, At, B, C, h})
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == delta.scalar_type(),
                "the C++ scan takes contiguous CPU tensors of one dtype");
  TORCH_CHECK(delta.dim() == 3 && At.dim() == 2 && B.dim() == 3 && h.dim() == 3 && u.sizes() == delta.sizes() &&
                  C.sizes() == B.sizes() && B.size(0) == delta.size(0) && B.size(1) == delta.size(1) &&
                  B.size(2) == At.size(0) && At.size(1) == delta.size(2) && h.size(0) == delta.size(0) &&
                  h.size(1) == At.size(0) && h.size(2) == At.size(1),
              "the C++ scan's inputs disagree in size");
}

std::vector<torch::Tensor> forward(torch::Tensor delta, torch::Tensor u, torch::Tensor At,
                                   torch::Tensor B, torch::Tensor C, torch::Tensor h0) {
  check(delta, u, At, B, C, h0);
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
  check(delta, u, At, B, C, h0);
  check(gy, u, At, B, C, ghT);
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


_FLAGS = ["-O3", "-ffast-math", "-march=native"]


def _build_name() -> str:
    """The cached build's name: one per source, flags, torch and CPU, since a build made
    for another CPU would crash with an illegal instruction rather than fail to load."""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    key = "\0".join([_SOURCE, *_FLAGS, torch.__version__, cpu])
    return "longllava_cpu_scan_" + hashlib.sha256(key.encode()).hexdigest()[:16]


@functools.cache
def load() -> ModuleType | str:
    """The compiled extension, or why it cannot be built here."""
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline(_build_name(), cpp_sources=_SOURCE, functions=["forward", "backward"], extra_cflags=_FLAGS)
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
        return y, h.transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable  # the C++ backward builds no graph of its own
    def backward(ctx, gy, gh):
        gdelta, gu, gA, gB, gC, gh0 = load().backward(*ctx.saved_tensors, gy.contiguous(), gh.transpose(1, 2).contiguous())
        return gdelta, gu, gA.t(), gB, gC, gh0.transpose(1, 2)


def selective_scan(x, dt, A, B, C, D, z, dt_bias, ssm_state):
    """Mamba-1 selective scan over a chunk, continuing from ``ssm_state``; see ``model.kernels``."""
    xt, dtt, Bt, Ct = (t.transpose(1, 2).float() for t in (x, dt, B, C))
    delta = F.softplus(dtt if dt_bias is None else dtt + dt_bias.float())
    y, last = _Scan.apply(delta, xt, A.to(delta.dtype), Bt, Ct, ssm_state.to(delta.dtype))
    return skip_and_gate(y, xt, D, z, x.dtype), last
