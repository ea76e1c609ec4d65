"""Helpers for training tests: a tiny LongLLaVA config and LLaVA-format files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from model.config import LongLLaVAConfig, VisionConfig
from model.tokenizer import ByteTokenizer

# LongLLaVA's structure at toy size: 8 layers with attention at 4, MoE on odd layers, an
# 84 px tower whose 6x6 patch grid gives 36 image tokens
TINY = LongLLaVAConfig(
    vocab_size=ByteTokenizer.vocab_size,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_experts=4,
    num_experts_per_tok=2,
    mamba_d_state=4,
    mamba_dt_rank=4,
    mm_hidden_size=16,
    image_tokens=36,
    vision_config=VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=84, projection_dim=16
    ),
    builtin_tokenizer="byte",
)


def write_image(path: Path, seed: int, size: tuple[int, int] = (60, 40)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.name


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def qa(question: str, answer: str, **media) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **media}
