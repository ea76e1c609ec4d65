"""Pretraining a vision tower from scratch on dense region captions, standing in for CLIP.

LongLLaVA's tower arrives pretrained (CLIP ViT-L/336); the embedded demo model's cannot,
since no CLIP ships in a package. Learning to read through a random LLM from a few answer
tokens is slow, so the demo recipe first teaches the tower directly, as dense captioning
pretrains vision encoders: every pooled cell of the ``grid x grid`` feature map predicts
the text of the screen element centred in it, followed by its centre in the action
grammar's 0..1000 units ("Save 314 219"), or nothing. A linear head reads each cell;
it is thrown away afterwards, and the LLaVA stages start from the tower it leaves.

Records are JSONL: ``{"image": path, "regions": [{"x": 314, "y": 219, "text": "Save"}]}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from model.longllava import LongLLaVA
from model.prompt import EOS_TOKEN
from model.tokenizer import ByteTokenizer
from model.vision import preprocess_image

MAX_CHARS = 32
IGNORE = -100


def cell_targets(regions: list[dict], grid: int, tokenizer: ByteTokenizer) -> torch.Tensor:
    """``[grid * grid, MAX_CHARS]`` byte ids: each cell's text and EOS, then ``IGNORE``."""
    targets = torch.full((grid * grid, MAX_CHARS), IGNORE, dtype=torch.long)
    targets[:, 0] = tokenizer.eos_id
    for region in regions:
        cell = min(region["y"] * grid // 1000, grid - 1) * grid + min(region["x"] * grid // 1000, grid - 1)
        ids = tokenizer.encode(f"{region['text']} {region['x']} {region['y']}"[: MAX_CHARS - 1] + EOS_TOKEN)
        targets[cell] = IGNORE
        targets[cell, : len(ids)] = torch.tensor(ids)
    return targets


class RegionHead(nn.Module):
    """Reads every cell's text from its feature, one linear classifier per character slot."""

    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.proj = nn.Linear(width, MAX_CHARS * vocab)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).unflatten(-1, (MAX_CHARS, self.vocab))


def pretrain_tower(model: LongLLaVA, records: Path, steps: int, batch_size: int = 32, lr: float = 1e-3,
                   seed: int = 0, log: Path | None = None, progress: bool = True) -> list[float]:
    """Trains ``model.vision`` in place; returns the loss of every step."""
    tokenizer = ByteTokenizer()
    grid = model.config.image_grid
    rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
    folder = records.parent
    head = RegionHead(model.config.mm_hidden_size, tokenizer.vocab_size)
    params = [*model.vision.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    losses = []
    out = open(log, "a", encoding="utf-8") if log else None
    model.vision.train()
    for step in tqdm(range(steps), desc="tower", unit="step", disable=not progress, dynamic_ncols=True):
        for group in optimizer.param_groups:  # warmup, then cosine to zero
            group["lr"] = lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
        picks = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
        pixels = torch.stack([preprocess_image(Image.open(folder / rows[i]["image"]), model.config) for i in picks])
        targets = torch.stack([cell_targets(rows[i]["regions"], grid, tokenizer) for i in picks])
        logits = head(model.vision(pixels))
        loss = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if out is not None:
            out.write(json.dumps({"step": step + 1, "loss": losses[-1]}) + "\n")
    if out is not None:
        out.close()
    return losses
