"""Fixtures for model tests: a transformers Jamba and a HybridLM with the same random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import JambaConfig, JambaForCausalLM

from model.convert import from_jamba_config, from_jamba_state_dict
from model.llm import HybridLM


def jamba_config(layers: int = 9, experts: int = 1, attn_period: int = 8, attn_offset: int = 4, **kw) -> JambaConfig:
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=experts,
        num_experts_per_tok=min(2, experts),
        attn_layer_period=attn_period,
        attn_layer_offset=attn_offset,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=8,
    )
    base.update(kw)
    return JambaConfig(**base)


def jamba_pair(config: JambaConfig, seed: int = 0) -> tuple[JambaForCausalLM, HybridLM]:
    """Every parameter is perturbed away from its init, so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    ref = JambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("A_log"):
                p.add_(torch.randn_like(p) * 0.3)
            elif p.dim() == 1:  # norms, D, biases
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name or name.endswith(".D") else 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    mine = HybridLM(from_jamba_config(config)).eval()
    mine.load_state_dict(from_jamba_state_dict(ref.state_dict()), strict=True)
    return ref, mine


@pytest.fixture
def make_pair():
    """``make_pair(layers=.., experts=.., ...) -> (transformers model, HybridLM)``."""
    return lambda seed=0, **kw: jamba_pair(jamba_config(**kw), seed)
