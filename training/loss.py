"""The training forward pass: a ``Batch`` to the summed next-token loss over its labels.

Images go through the tower and projector with autograd (``LongLLaVA.encode_images`` is
for inference and keeps no graph), are spliced into each sample's embeddings, and the
right-padded rows run through ``HybridLM.forward_batch``. Position ``t`` predicts label
``t + 1``; the LM head runs on labelled positions only. A part whose parameters are all
frozen runs without a graph, which saves its backward and its activations.

The loss is a sum, not a mean, so that callers can divide by the labelled-token count of
a whole optimizer step (across micro-batches and workers): then gradient accumulation and
data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from model.longllava import LongLLaVA

from .collate import IGNORE_INDEX, Batch


def _maybe_no_grad(module: nn.Module) -> contextlib.AbstractContextManager:
    trains = any(p.requires_grad for p in module.parameters())
    return contextlib.nullcontext() if trains else torch.no_grad()


def image_features(model: LongLLaVA, pixels: torch.Tensor) -> torch.Tensor | None:
    """``[images, image_tokens, hidden]`` from preprocessed pixels, differentiable."""
    if not pixels.numel():
        return None
    with _maybe_no_grad(model.vision):
        features = model.vision(pixels.to(model.device))
    with _maybe_no_grad(model.projector):
        return model.projector(features)


def batch_embeds(model: LongLLaVA, batch: Batch) -> torch.Tensor:
    """The batch's input embeddings, ``[batch, L, hidden]``, right-padded with zeros."""
    features = image_features(model, batch.pixels)
    rows, start = [], 0
    for ids, n in zip(batch.input_ids, batch.images_per_sample):
        rows.append(model.embed(ids, features[start : start + n] if n else None))
        start += n
    return nn.utils.rnn.pad_sequence(rows, batch_first=True)


class LossModel(nn.Module):
    """``forward(batch) -> (summed loss, labelled tokens)``: the module that DDP wraps, so
    its forward is the whole training computation."""

    def __init__(self, model: LongLLaVA, gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, batch: Batch) -> tuple[torch.Tensor, int]:
        llm = self.model.llm
        hidden = llm.forward_batch(batch_embeds(self.model, batch), self.gradient_checkpointing)
        targets = batch.labels[:, 1:].to(hidden.device)
        labelled = targets != IGNORE_INDEX
        logits = llm.lm_head(hidden[:, :-1][labelled])
        loss = F.cross_entropy(logits.float(), targets[labelled], reduction="sum")
        return loss, int(labelled.sum())
