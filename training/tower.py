"""Pretraining a vision tower from scratch to read screens, standing in for CLIP.

LongLLaVA's tower arrives pretrained (CLIP ViT-L/336); the embedded demo model's cannot,
since no CLIP ships in a package. A random tower and a random LLM trained together learn
to read only very slowly: the LLM must first learn where to look, the tower what to
see. So the tower first learns to read on its own, locally, as a text-spotting model
does: each pooled image token predicts what its cell of the screen shows (the title, an
element's text or icon, with the element's centre in the action grammar's 0..1000
units: "Save 314 219"), character by character through a linear head. The loss falls on
a few cells per image each step, drawn with a bias to cells that show something. The
head is thrown away afterwards.

Records are JSONL: ``{"image": path, "cells": ["Toolbar", "", "Save 314 219", ...]}``,
one string per pooled token, row by row (``training.synthetic.cell_texts``).
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

MAX_CHARS = 64
CELLS_PER_IMAGE = 6
SHOWING_BIAS = 3.0  # a cell that shows something is drawn 4 times as often as an empty one
IGNORE = -100


def text_target(text: str, tokenizer: ByteTokenizer) -> torch.Tensor:
    """``[MAX_CHARS]`` byte ids: the text (cut to fit) and EOS, then ``IGNORE``."""
    ids = tokenizer.encode(text[: MAX_CHARS - 1] + EOS_TOKEN)
    target = torch.full((MAX_CHARS,), IGNORE, dtype=torch.long)
    target[: len(ids)] = torch.tensor(ids)
    return target


class CaptionHead(nn.Module):
    """Reads a cell's feature as text, one linear classifier per character position."""

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
    rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
    head = CaptionHead(model.config.mm_hidden_size, tokenizer.vocab_size)
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
        pixels = torch.stack([preprocess_image(Image.open(records.parent / rows[i]["image"]), model.config) for i in picks])
        shows = torch.tensor([[bool(text) for text in rows[i]["cells"]] for i in picks])
        cells = torch.multinomial(1.0 + SHOWING_BIAS * shows, CELLS_PER_IMAGE, generator=generator)  # [batch, k]
        targets = torch.stack([torch.stack([text_target(rows[i]["cells"][c], tokenizer) for c in chosen.tolist()])
                               for i, chosen in zip(picks, cells)])  # [batch, k, MAX_CHARS]
        features = model.vision(pixels)  # [batch, cells, width]
        chosen = features.gather(1, cells[..., None].expand(-1, -1, features.shape[-1]))
        logits = head(chosen)  # [batch, k, MAX_CHARS, vocab]
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
