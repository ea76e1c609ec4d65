"""The training path: the reference kernels' gradients, checked numerically at float64, and
``HybridLM.forward_batch`` against the inference path it must agree with."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from model import cpu_kernels, kernels, ops
from model.config import HybridLMConfig
from model.llm import HybridLM

CPP_SCAN = pytest.mark.skipif(isinstance(cpu_kernels.load(), str), reason=str(cpu_kernels.load()))
SCANS = [kernels, pytest.param(cpu_kernels, marks=CPP_SCAN, id="cpp")]

TINY = HybridLMConfig(
    vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=8, num_attention_heads=2,
    num_key_value_heads=1, num_experts=3, num_experts_per_tok=2, mamba_d_state=3, mamba_dt_rank=4,
)
SMALLER = TINY.model_copy(update=dict(hidden_size=8, intermediate_size=8, mamba_d_state=2, mamba_dt_rank=2))


def f64(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()


def test_causal_conv1d_gradients():
    x, w, b, state = f64(2, 3, 7), f64(3, 4, seed=1), f64(3, seed=2), f64(2, 3, 4, seed=3)
    assert gradcheck(lambda *a: kernels.causal_conv1d(*a), (x, w, b, state))


@pytest.mark.parametrize("module", SCANS)
@pytest.mark.parametrize("length", [1, 7, 9])  # one position; padded to whole blocks; exact blocks
def test_selective_scan_gradients(length, module):
    d, n = 3, 2
    args = (
        f64(2, d, length), f64(2, d, length, seed=1, scale=0.5), -f64(d, n, seed=2).detach().abs().add(0.3).requires_grad_(),
        f64(2, n, length, seed=3), f64(2, n, length, seed=4), f64(d, seed=5), f64(2, d, length, seed=6),
        f64(d, seed=7), f64(2, d, n, seed=8),
    )

    def scan(x, dt, A, B, C, D, z, dt_bias, h0):
        y, h = module.selective_scan(x, dt, A, B, C, D, z, dt_bias, h0)
        return y.double(), h.double()

    # the reference scan computes in float32 internally; check it at float64 by patching that away
    with _float64():
        assert gradcheck(scan, args)


@CPP_SCAN
@pytest.mark.parametrize("optional", [True, False])  # with and without D, z and the dt bias
def test_cpp_scan_matches_the_reference_in_float32(optional):
    """The C++ scan against the reference at a training shape: outputs, final state, and
    every input's gradient, from a non-zero starting state."""
    b, d, n, length = 3, 32, 8, 50
    args = [t.float().detach().requires_grad_() for t in (
        f64(b, d, length), f64(b, d, length, seed=1, scale=0.5), -f64(d, n, seed=2).abs().add(0.3),
        f64(b, n, length, seed=3), f64(b, n, length, seed=4), f64(d, seed=5), f64(b, d, length, seed=6),
        f64(d, seed=7), f64(b, d, n, seed=8))]
    if not optional:
        args[5] = args[6] = args[7] = None
    results = []
    for module in (kernels, cpu_kernels):
        for t in args:
            if t is not None:
                t.grad = None
        y, h = module.selective_scan(*args)
        (y.square().sum() + (h * h.detach().sign()).sum()).backward()
        results.append([y, h] + [t.grad for t in args if t is not None])
    for ours, reference in zip(results[1], results[0]):
        assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4 * float(reference.detach().abs().max()))


@CPP_SCAN
def test_training_path_takes_the_cpp_scan_and_agrees_with_the_reference():
    torch.manual_seed(0)
    llm = HybridLM(TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 19))
    with ops.use_kernels("auto"):
        assert ops.training_kernels("cpu") is cpu_kernels
    grads = []
    for choice in ("auto", "torch"):
        llm.zero_grad()
        with ops.use_kernels(choice):
            llm.lm_head(llm.forward_batch(llm.embed_tokens(ids))).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5) for n in grads[0])


def test_attention_gradients():
    q, k, v = f64(1, 2, 5, 4), f64(1, 1, 5, 4, seed=1), f64(1, 1, 5, 4, seed=2)
    assert gradcheck(kernels.attention, (q, k, v))


@pytest.mark.parametrize("choice", ["torch", pytest.param("auto", marks=CPP_SCAN, id="cpp")])
def test_whole_model_gradients_at_float64(choice):
    torch.manual_seed(0)
    llm = HybridLM(SMALLER).double()
    embeds = f64(2, 4, SMALLER.hidden_size, seed=9)
    with _float64(), ops.use_kernels(choice):
        assert gradcheck(lambda e: llm.forward_batch(e), (embeds,), eps=1e-6, atol=1e-5)


def test_forward_batch_matches_prefill_and_ignores_right_padding():
    torch.manual_seed(0)
    llm = HybridLM(TINY).eval()
    ids = torch.randint(0, TINY.vocab_size, (3, 23))
    with torch.no_grad():
        hidden = llm.forward_batch(llm.embed_tokens(ids))
        for row in range(3):
            expected = llm.prefill(llm.new_state(), llm.embed_tokens(ids[row]), logits="all")
            assert torch.allclose(llm.lm_head(hidden[row]), expected, atol=1e-5)
        shorter = llm.forward_batch(llm.embed_tokens(ids[:, :11]))
    assert torch.allclose(shorter, hidden[:, :11], atol=1e-5)  # 3e-6 apart on this CPU, 1e-6 held on the last


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    llm = HybridLM(TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 17))
    grads = []
    for checkpointing in (False, True):
        llm.zero_grad()
        llm.lm_head(llm.forward_batch(llm.embed_tokens(ids), gradient_checkpointing=checkpointing)).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


class _float64:
    """The scan and the MoE router compute in float32 (as mamba-ssm and Jamba do); gradcheck
    needs float64 throughout, so meanwhile ``Tensor.float`` is the identity on float64
    tensors and ``softmax`` keeps their dtype."""

    def __enter__(self):
        self.float, self.softmax = torch.Tensor.float, F.softmax
        torch.Tensor.float = lambda t: t if t.dtype == torch.float64 else self.float(t)
        F.softmax = lambda t, dim, dtype=None: self.softmax(t, dim, dtype=None if t.dtype == torch.float64 else dtype)

    def __exit__(self, *exc):
        torch.Tensor.float, F.softmax = self.float, self.softmax
