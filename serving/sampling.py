"""Next-token selection: greedy, temperature and nucleus (top-p). The parameters are in ``serving.types``."""

from __future__ import annotations

import torch

from .types import SamplingParams

__all__ = ["SamplingParams", "find_stop", "sample_batch", "sample_next"]


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from the logits of the last position (``[vocab]``)."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def sample_batch(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits [batch, vocab]``; greedy rows share one device sync."""
    greedy = logits.argmax(-1).tolist()
    return [g if p.temperature == 0.0 else sample_next(row, p, rng) for g, row, p, rng in zip(greedy, logits, params, generators)]


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None
