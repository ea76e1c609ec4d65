"""Helpers for training tests: a tiny LongLLaVA config and LLaVA-format files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from model.config import LongLLaVAConfig, VisionConfig
from model.default import DEFAULT_CONFIG

# the embedded model's structure at toy size: 8 layers with attention at 4, MoE with 4
# experts top-2 on odd layers, an 84 px tower whose 6x6 patch grid gives 36 image tokens;
# CLIP's pixel statistics (the config's defaults), which suit the tests' noise images
DEFAULTS = LongLLaVAConfig.model_fields
TINY = DEFAULT_CONFIG.model_copy(update=dict(
    hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
    mamba_d_state=4, mamba_dt_rank=4, mm_hidden_size=16,
    image_mean=DEFAULTS["image_mean"].default, image_std=DEFAULTS["image_std"].default,
    vision_config=VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=84, projection_dim=16
    ),
))


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
