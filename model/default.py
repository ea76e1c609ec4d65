"""The embedded default model: LongLLaVA's whole structure at laptop size, trained (what it
learned, and what it did not, is in docs/benchmarks.md).

Eight hybrid layers with attention at layer 1 (1 in 8), MoE with 4 experts top-2 on odd
layers, a 4-layer CLIP-style tower at 168 px whose 12x12 patch grid pools to 36 tokens
(6x6), the GELU projector, and the byte-level tokenizer, so it runs with no files but
its own. Its pixels are normalised with the envs' screen statistics, not CLIP's photo
statistics: a tower trained from scratch learns to read far faster on centred inputs.

The trained weights ship in ``model/weights/default`` (half precision, with
``manifest.json`` saying how they were made: ``python -m training.pipeline --preset demo``).
``default_model()`` loads them; ``default_model(pretrained=False)`` builds seeded random
weights of the same config, for tests that want a model quickly and owe nothing to training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .config import LongLLaVAConfig, VisionConfig
from .longllava import LongLLaVA
from .tokenizer import ByteTokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights" / "default"
SCREEN_MEAN, SCREEN_STD = (0.83, 0.835, 0.824), (0.27, 0.25, 0.25)  # RGB over the envs' screens

DEFAULT_CONFIG = LongLLaVAConfig(
    vocab_size=ByteTokenizer.vocab_size,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=8,
    attn_layer_offset=1,  # Jamba's 4 learnt the lookup of a named button about half as fast (bench/clicking.py)
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=4,
    num_experts_per_tok=2,
    mamba_d_state=8,  # half Jamba's 16: a CPU training step 1.4x to 1.6x faster (bench/train_throughput.py)
    mm_hidden_size=128,
    image_tokens=36,
    image_mean=SCREEN_MEAN,
    image_std=SCREEN_STD,
    vision_config=VisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=168,
        projection_dim=128,
    ),
    builtin_tokenizer="byte",
)


def default_model(pretrained: bool = True, seed: int = 0) -> LongLLaVA:
    """The embedded model: its shipped weights, or seeded random ones (the caller's RNG is left alone)."""
    if pretrained:
        if not (WEIGHTS_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded model's weights are missing from {WEIGHTS_DIR}; "
                "build them with `python -m training.pipeline --preset demo --install`"
            )
        return load_checkpoint(WEIGHTS_DIR, dtype=torch.float32).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LongLLaVA(DEFAULT_CONFIG).eval()
