"""The hybrid LongLLaVA language model (Jamba layout), in one file.

Layer ``i`` mixes with attention when ``i % attn_layer_period == attn_layer_offset`` and
with a Mamba-1 mixer otherwise; its feed-forward is a mixture of experts when
``i % expert_layer_period == expert_layer_offset`` and one SwiGLU MLP otherwise. Attention
has no positional embedding: the Mamba layers carry order.

Every mixer reads and writes a ``SessionState``, so the same ``forward`` serves a first
prefill, an append onto a long history, and one-token decode. ``forward_batch`` is the
training path: a right-padded batch from empty states, through differentiable kernels
(the Triton kernels have no backward; ``ops.training_kernels``), with optional activation
checkpointing per layer. Module names match the
LongLLaVA checkpoints' keys (``mamba``, ``self_attn``, ``moe``, ``pre_moe_layernorm``,
``final_layernorm``), so those load without renaming inside a layer.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.checkpoint import checkpoint

from . import kernels as reference
from . import ops
from .config import HybridLMConfig
from .state import DecodeBatch, KVCache, MambaLayerState, SessionState


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (it accumulates in float32 for half-precision inputs). Jamba instead
        # rounds the normalised value to the input dtype before scaling: in float32 the two
        # are the same; in bf16 they differ by at most a rounding, for a third of the launches.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class MambaMixer(nn.Module):
    """Mamba-1 with Jamba's RMSNorms on dt, B and C. ``forward`` takes a chunk; ``step`` one token."""

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        d, n, r = config.d_inner, config.mamba_d_state, config.dt_rank
        self.d_inner, self.d_state, self.dt_rank = d, n, r
        self.in_proj = nn.Linear(config.hidden_size, 2 * d, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(d, d, config.mamba_d_conv, groups=d, bias=config.mamba_conv_bias)
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, config.hidden_size, bias=config.mamba_proj_bias)
        # Jamba's inner norms; the capitalised names are those of LongLLaVA's checkpoints
        norm = (lambda dim: RMSNorm(dim, config.rms_norm_eps)) if config.mamba_inner_layernorms else (lambda dim: nn.Identity())
        self.dt_layernorm, self.B_layernorm, self.C_layernorm = norm(r), norm(n), norm(n)
        self._init_dt()

    @torch.no_grad()
    def _init_dt(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's initialisation of the step size, for training from scratch: softplus of
        the bias is log-uniform in [dt_min, dt_max], so the state starts with memories of
        10 to 1000 tokens. (nn.Linear's default bias would give dt near 0.7, a memory of
        a few tokens, and a random model would learn to carry nothing far.)"""
        self.dt_proj.weight.uniform_(-self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.empty_like(self.dt_proj.bias).uniform_(math.log(dt_min), math.log(dt_max)).exp()
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dt (before bias and softplus), B and C from the conv output ``x [..., d_inner]``."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(self.dt_layernorm(dt), self.dt_proj.weight)  # bias goes in with softplus
        return dt, self.B_layernorm(B), self.C_layernorm(C)

    def forward(self, h: torch.Tensor, state: MambaLayerState) -> torch.Tensor:
        if h.shape[1] == 1:
            return self.step(h, state)
        return self.chunk(h, state, ops.kernels_for(h.device))

    def forward_full(self, h: torch.Tensor) -> torch.Tensor:
        """``h [batch, L, hidden]`` from zero states, through differentiable kernels (``ops.training_kernels``)."""
        b, d = h.shape[0], self.d_inner
        k = self.conv1d.weight.shape[-1]
        zeros = MambaLayerState(h.new_zeros(b, d, k), h.new_zeros(b, d, self.d_state, dtype=torch.float32))
        return self.chunk(h, zeros, ops.training_kernels(h.device))

    def chunk(self, h: torch.Tensor, state: MambaLayerState, k: ModuleType) -> torch.Tensor:
        """A chunk ``h [batch, L, hidden]`` continuing from ``state`` (updated), on kernel set ``k``."""
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # [batch, d_inner, L] each
        x, state.conv = k.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, state.conv)
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        A = -torch.exp(self.A_log.float())
        y, state.ssm = k.selective_scan(
            x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D, z, self.dt_proj.bias, state.ssm
        )
        return self.out_proj(y.transpose(1, 2))

    def step(self, h: torch.Tensor, state: MambaLayerState) -> torch.Tensor:
        """One token for each of ``batch`` sessions: ``h`` is ``[batch, 1, hidden]``, the
        states ``[batch, ...]`` (a ``DecodeBatch``'s slots), updated in place."""
        k = ops.kernels_for(h.device)
        x, z = self.in_proj(h[:, 0]).chunk(2, dim=-1)  # [batch, d_inner] each
        x = k.causal_conv1d_update(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, state.conv)
        dt, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        y = k.selective_state_update(state.ssm, x, dt, A, B, C, self.D, z, self.dt_proj.bias)
        return self.out_proj(y).unsqueeze(1)


class Attention(nn.Module):
    """Grouped-query attention over the session's K/V cache, with no positional embedding."""

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, caches: KVCache | list[KVCache]) -> torch.Tensor:
        """``h`` is ``[batch, L, hidden]`` with one cache per row. Each row attends to its own
        cache at its own length, so sessions of different histories decode together."""
        caches = [caches] if isinstance(caches, KVCache) else caches
        if len(caches) != h.shape[0]:
            raise ValueError(f"{h.shape[0]} rows of input but {len(caches)} K/V caches")
        out = ops.kernels_for(h.device).append_and_attend(*self._qkv(h), caches)
        return self._out(out)

    def forward_full(self, h: torch.Tensor) -> torch.Tensor:
        """Causal attention within each row of ``h [batch, L, hidden]``, with no cache."""
        return self._out(reference.attention(*self._qkv(h)))

    def _qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, L, _ = h.shape
        q = self.q_proj(h).view(b, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, L, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _out(self, out: torch.Tensor) -> torch.Tensor:
        """``[batch, heads, L, head_dim]`` back to ``[batch, L, hidden]`` through ``o_proj``."""
        return self.o_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Softmax router, top-k experts, the chosen weights NOT renormalised (as Jamba).

    A layer with one expert is a dense SwiGLU MLP with no router; it keeps the
    ``experts.0`` name, as in LongLLaVA's checkpoints.
    """

    def __init__(self, config: HybridLMConfig, num_experts: int):
        super().__init__()
        self.top_k = min(config.num_experts_per_tok, num_experts)
        self.router = nn.Linear(config.hidden_size, num_experts, bias=False) if num_experts > 1 else None
        self.experts = nn.ModuleList(MLP(config) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return self.experts[0](x)
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router(flat), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e in chosen.unique().tolist():
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            out.index_add_(0, token, self.experts[e](flat[token]) * weights[token, slot, None])
        return out.view_as(x)


class HybridBlock(nn.Module):
    """Pre-norm residual block: norm, mixer, add; then norm, feed-forward, add."""

    def __init__(self, config: HybridLMConfig, index: int):
        super().__init__()
        self.index = index
        self.is_attention = config.is_attention_layer(index)
        if self.is_attention:
            self.self_attn = Attention(config)
        else:
            self.mamba = MambaMixer(config)
        self.moe = MoE(config, config.num_experts_of_layer(index))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_moe_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, state: SessionState | DecodeBatch | None) -> torch.Tensor:
        """With a state, the next chunk of a session; with None, whole rows from empty states."""
        x = self.input_layernorm(h)
        if self.is_attention:
            x = self.self_attn(x, state.kv[self.index]) if state is not None else self.self_attn.forward_full(x)
        else:
            x = self.mamba(x, state.mamba[self.index]) if state is not None else self.mamba.forward_full(x)
        h = h + x
        return h + self.moe(self.pre_moe_layernorm(h))


class HybridLM(nn.Module):
    """Embeddings, hybrid blocks, final norm and LM head."""

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def _init_weights(self, std: float = 0.02) -> None:
        """For training from scratch: embeddings N(0, std), as Jamba (``initializer_range``
        0.02), where PyTorch's N(0, 1) would drown what the layers and the image features
        add to the stream; every linear layer keeps PyTorch's fan-in-scaled default, as
        mamba-ssm's mixers do. Jamba's N(0, 0.02) for the projections suits its width of
        4096; at the embedded model's 128 it is 2-3x below fan-in scaling, and the
        attention's query-key product starts 5-7x smaller: the model then did not start
        to learn a 4-character copy in 800 steps (``bench/copying.py``)."""
        self.embed_tokens.weight.normal_(0.0, std)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_state(self, max_snapshots: int = 64) -> SessionState:
        return SessionState.empty(self.config, self.dtype, self.device, max_snapshots)

    def prefill(
        self, state: SessionState, embeds: torch.Tensor, logits: Literal["last", "all", "none"] = "last"
    ) -> torch.Tensor | None:
        """Append a chunk of embeddings ``[L, hidden]`` (or ``[1, L, hidden]``) onto ``state``.

        Returns the logits of the last position (``[vocab]``), of every position
        (``[L, vocab]``), or nothing. Only the new tokens are computed; the state grows by L.
        """
        if embeds.dim() == 2:
            embeds = embeds.unsqueeze(0)
        if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"prefill takes embeddings of shape [L, {self.config.hidden_size}], got {tuple(embeds.shape)}"
            )
        if embeds.shape[1] == 0:
            raise ValueError("prefill needs at least one token")
        state.check_not_batched("appended to")
        h = embeds.to(self.dtype)
        for layer in self.layers:
            h = layer(h, state)
        state.length += embeds.shape[1]
        state.last_hidden = h[0, -1:].clone()
        if logits == "none":
            return None
        return self.head(state.last_hidden)[0] if logits == "last" else self.head(h[0])

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from hidden rows ``[n, hidden]`` (outputs of the last block): final norm and LM head."""
        return self.lm_head(self.final_layernorm(hidden))

    def decode(self, batch: DecodeBatch, embeds: torch.Tensor) -> torch.Tensor:
        """One token for every session of ``batch``: ``embeds`` is ``[batch, hidden]``.
        Returns the next-token logits ``[batch, vocab]``; each session grows by one."""
        if embeds.shape != (len(batch), self.config.hidden_size):
            raise ValueError(
                f"decode takes embeddings of shape [{len(batch)}, {self.config.hidden_size}], got {tuple(embeds.shape)}"
            )
        h = embeds.to(self.dtype).unsqueeze(1)
        for layer in self.layers:
            h = layer(h, batch)
        batch.advance(h[:, 0])
        return self.head(h[:, 0])

    def forward_batch(self, embeds: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
        """The final-normed hidden states ``[batch, L, hidden]`` of whole sequences ``embeds
        [batch, L, hidden]``, each from an empty state: the training path.

        Every op is causal, so right padding never changes the real positions. It runs
        differentiable kernels: the reference, with the C++ scan on the CPU where it builds
        (``ops.training_kernels``); the Triton kernels have no backward.
        ``gradient_checkpointing`` recomputes each layer in the backward pass instead of
        keeping its activations (the reference scan's are ``L x d_inner x d_state`` floats).
        """
        if embeds.dim() != 3 or embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"forward_batch takes [batch, L, {self.config.hidden_size}], got {tuple(embeds.shape)}")
        h = embeds.to(self.dtype)
        for layer in self.layers:
            if gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, None, use_reentrant=False)
            else:
                h = layer(h, None)
        return self.final_layernorm(h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full pass over ``input_ids [L]`` from an empty state: the logits of every position."""
        return self.prefill(self.new_state(), self.embed_tokens(input_ids), logits="all")
