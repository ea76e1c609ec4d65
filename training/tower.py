"""Pretraining a vision tower from scratch on screen captions, standing in for CLIP.

LongLLaVA's tower arrives pretrained (CLIP ViT-L/336); the embedded demo model's cannot,
since no CLIP ships in a package. A random LLM learns to read from image tokens only
slowly when what it needs sits in one or two of the 36 pooled cells (it must first learn
where to look), and quickly when every cell carries it, as a photo's colour does. So the
tower learns what CLIP's image embedding is for: every pooled cell predicts the screen's
key text, its title and each labelled element with its centre in the action grammar's
0..1000 units ("Toolbar: Save 314 219; Open 671 312"), character by character through a
linear head. The loss falls on a few random cells per image each step, which is as good
as all of them for the tower and far cheaper. The head is thrown away afterwards.

Records are JSONL: ``{"image": path, "text": "Toolbar: Save 314 219; ..."}``.
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
CELLS_PER_IMAGE = 4
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
        targets = torch.stack([text_target(rows[i]["text"], tokenizer) for i in picks])
        features = model.vision(pixels)  # [batch, cells, width]
        cells = torch.rand(features.shape[:2], generator=generator).argsort(1)[:, :CELLS_PER_IMAGE]
        chosen = features.gather(1, cells[..., None].expand(-1, -1, features.shape[-1]))
        logits = head(chosen)  # [batch, CELLS_PER_IMAGE, MAX_CHARS, vocab]
        loss = F.cross_entropy(logits.flatten(0, 2), targets[:, None].expand(-1, CELLS_PER_IMAGE, -1).flatten(),
                               ignore_index=IGNORE)
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
