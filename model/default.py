"""The embedded default model: LongLLaVA's whole structure at laptop size.

Eight hybrid layers with attention at layer 4 (1 in 8), MoE with 4 experts top-2 on odd
layers, a 2-layer CLIP tower at 336 px whose 24x24 grid pools to 144 tokens, the GELU
projector, and the byte-level tokenizer, so it runs with no files at all. Its weights are
random (seeded) until a training recipe produces a checkpoint.
"""

from __future__ import annotations

import torch

from .config import LongLLaVAConfig, VisionConfig
from .longllava import LongLLaVA
from .tokenizer import ByteTokenizer

DEFAULT_CONFIG = LongLLaVAConfig(
    vocab_size=ByteTokenizer.vocab_size,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_experts=4,
    num_experts_per_tok=2,
    mamba_dt_rank=16,
    mm_hidden_size=64,
    vision_config=VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, projection_dim=64
    ),
    builtin_tokenizer="byte",
)


def default_model(seed: int = 0) -> LongLLaVA:
    """The default model with seeded random weights; the caller's RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LongLLaVA(DEFAULT_CONFIG).eval()
