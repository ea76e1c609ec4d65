"""The decode loop: every generating session advances one token per forward.

``DecodeLoop.step()`` is schedule, execute, update, as in vLLM v1's engine core:

- **schedule**: the requests still running, as one ``DecodeBatch`` over their states
  (rebuilt only when a request finishes);
- **execute**: sample each request's next token from its logits, and run one decode
  forward for all of them;
- **update**: the tokens join each session's history and step table, and each request's
  ``OutputStream`` turns its token into events; finished requests leave.

Every sampled token joins the history, EOS included, so the next append continues after
it. A request's first logits come from its session's ``last_hidden`` through the model's
head, one session at a time: that is exactly what a session restored from a checkpoint
computes, so a restored session generates what the live one would have.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from model.longllava import LongLLaVA
from model.state import DecodeBatch

from .outputs import OutputStream
from .sampling import sample_batch
from .sessions import Session
from .types import TokenEvent


@dataclass
class Request:
    """One session's side of a generation."""

    session: Session
    stream: OutputStream
    rng: torch.Generator | None
    start: int  # the history's length when it began

    @property
    def added(self) -> int:
        return self.session.state.length - self.start


class DecodeLoop:
    """``vocab`` is the tokenizer's: a model with a larger embedding never samples ids
    that no text decodes to."""

    def __init__(self, model: LongLLaVA, model_lock: threading.Lock, requests: list[Request], vocab: int):
        self.model, self.model_lock, self.vocab = model, model_lock, vocab
        self.running = list(requests)
        self.batch: DecodeBatch | None = None
        with model_lock, torch.no_grad():
            self.logits = torch.cat([model.head(r.session.state.last_hidden) for r in requests])

    def step(self) -> list[tuple[Request, TokenEvent]]:
        """One token for every running request; returns their events in order."""
        running = self.running
        if self.batch is None:
            self.batch = DecodeBatch([r.session.state for r in running])
        logits = self.logits[:, : self.vocab]
        tokens = sample_batch(logits, [r.stream.sampling for r in running], [r.rng for r in running])
        with self.model_lock, torch.no_grad():
            logits = self.model.decode(self.batch, self.model.embed(tokens))
        events: list[tuple[Request, TokenEvent]] = []
        for r, token in zip(running, tokens):
            s = r.session
            s.tokens.append(token)
            s.steps.extend_reply(s.state.length, None)
            events += [(r, e) for e in r.stream.accept(token)]
        keep = [j for j, r in enumerate(running) if r.stream.finish is None]
        if len(keep) < len(running):
            self.close()
            self.running, logits = [running[j] for j in keep], logits[keep]
        self.logits = logits
        return events

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()
            self.batch = None
