"""Pretraining a vision tower from scratch to read screens, standing in for CLIP.

LongLLaVA's tower arrives pretrained (CLIP ViT-L/336); the embedded demo model's cannot,
since no CLIP ships in a package. A random tower and a random LLM trained together learn
to read only very slowly: the LLM must first learn where to look, the tower what to
see. So the tower first learns to read on its own, densely, as a text-spotting model
does: every pooled image token predicts what its cell of the screen shows, as a fixed
row of slots (``training.synthetic.cell_slots``): each glyph in the slot of its place in
the cell, an icon's colour and shape, and the label's first letters and the centre of
the labelled panel nearest the cell, where the cell lies near it or it is the screen's
only one. A glyph slot's answer depends on pixels at a fixed place, so one linear
classifier per slot reads it off the token (targets that spell a whole element's text
from any cell it touches stayed at chance level); the nearest panel's slots need the
tower's attention across cells, as a detector's dense heads do.
The loss falls on every slot of every cell, with the slots that show something
weighted up, since most show nothing. The head is thrown away afterwards.

Records are JSONL: ``{"image": path, "cells": ["Sign-in ...", ...]}``, one string of
``CELL_SLOTS`` characters per pooled token, row by row.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from model.longllava import LongLLaVA
from model.tokenizer import ByteTokenizer
from model.vision import fit_image, image_size, normalise_pixels

from .synthetic import CELL_SLOTS, EMPTY

SHOWING_WEIGHT = 5.0  # a slot that shows something counts 5 times an empty one
# decoded screens kept in memory: each is drawn several times (the demo's 1,700 toolbar steps
# of 32 draw each of its 6,000 toolbars about 9 times), and decoding a PNG took a fifth of a step
CACHE_BYTES = 1 << 30


class SlotHead(nn.Module):
    """Reads a cell's feature as its slots, one linear classifier over bytes per slot."""

    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.proj = nn.Linear(width, CELL_SLOTS * vocab)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).unflatten(-1, (CELL_SLOTS, self.vocab))


def slot_targets(cells: list[str], tokenizer: ByteTokenizer) -> torch.Tensor:
    """``[cells, CELL_SLOTS]`` byte ids of one screen's cell strings."""
    return torch.tensor([tokenizer.encode(cell) for cell in cells])


def pretrain_tower(model: LongLLaVA, records: Path, steps: int, batch_size: int = 32, lr: float = 3e-3,
                   seed: int = 0, log: Path | None = None, progress: bool = True, logged: int = 0) -> list[float]:
    """Trains ``model.vision`` in place; returns the loss of every step. ``logged``: the
    steps an earlier run (another phase) has written to ``log``, which this one follows."""
    tokenizer = ByteTokenizer()
    rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
    side = image_size(model.config)

    @functools.lru_cache(maxsize=CACHE_BYTES // (side * side * 3))
    def square(i: int):
        return fit_image(Image.open(records.parent / rows[i]["image"]), model.config)

    empty = tokenizer.encode(EMPTY)[0]
    with torch.random.fork_rng(devices=[]):  # the head's start is the seed's too, so a run repeats bit for bit
        torch.manual_seed(seed)
        head = SlotHead(model.config.mm_hidden_size, tokenizer.vocab_size)
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
        pixels = torch.stack([normalise_pixels(square(i), model.config) for i in picks])
        targets = torch.stack([slot_targets(rows[i]["cells"], tokenizer) for i in picks])  # [batch, cells, slots]
        logits = head(model.vision(pixels))  # [batch, cells, slots, vocab]
        weights = 1.0 + (SHOWING_WEIGHT - 1.0) * (targets != empty)
        loss = (F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none") * weights.flatten()).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if out is not None:
            out.write(json.dumps({"step": logged + step + 1, "loss": losses[-1]}) + "\n")
    if out is not None:
        out.close()
    return losses
