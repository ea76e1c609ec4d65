"""The decode loop: every generating session advances one token per forward.

``DecodeLoop.step()`` is schedule, execute, update, as in vLLM v1's engine core:

- **schedule**: the requests still running, as one ``DecodeBatch`` over their states
  (rebuilt only when a request joins or leaves);
- **execute**: sample each request's next token from its logits, and run one decode
  forward for all of them;
- **update**: the tokens join each session's history and step table, and each request's
  ``OutputStream`` turns its token into events; finished requests leave.

Requests join (``admit``) and leave (``withdraw``) between steps, so generations that
start at different times share the forwards (continuous batching); the engine's
``Scheduler`` calls them from its model thread.

Every sampled token joins the history, EOS included, so the next append continues after
it. A request's first logits come from its session's ``last_hidden`` through the model's
head, one session at a time: that is exactly what a session restored from a checkpoint
computes, so a restored session generates what the live one would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import torch

from model.longllava import LongLLaVA
from model.state import DecodeBatch

from .outputs import OutputStream
from .sampling import sample_batch
from .sessions import Session
from .types import TokenEvent


@dataclass(eq=False)  # compared and hashed by identity
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

    def __init__(self, model: LongLLaVA, vocab: int):
        self.model, self.vocab = model, vocab
        self.running: list[Request] = []
        self.logits: torch.Tensor | None = None  # [running, vocab]: each request's next-token logits
        self.batch: DecodeBatch | None = None

    @torch.no_grad()
    def admit(self, requests: list[Request]) -> None:
        """Requests join the running ones; they decode from the next step on."""
        first = torch.cat([self.model.head(r.session.state.last_hidden) for r in requests])
        self.close()  # the batch is rebuilt with them at the next step
        self.running += requests
        self.logits = first if self.logits is None else torch.cat([self.logits, first])

    def withdraw(self, requests: Collection[Request]) -> None:
        """Requests leave before they finish (their caller went away, or a step failed)."""
        self._keep([j for j, r in enumerate(self.running) if r not in requests])

    @torch.no_grad()
    def step(self) -> list[tuple[Request, TokenEvent]]:
        """One token for every running request; returns their events in order."""
        running = self.running
        if self.batch is None:
            self.batch = DecodeBatch([r.session.state for r in running])
        tokens = sample_batch(self.logits[:, : self.vocab], [r.stream.sampling for r in running], [r.rng for r in running])
        self.logits = self.model.decode(self.batch, self.model.embed(tokens))
        events: list[tuple[Request, TokenEvent]] = []
        for r, token in zip(running, tokens):
            s = r.session
            s.tokens.append(token)
            s.steps.extend_reply(s.state.length, None)
            events += [(r, e) for e in r.stream.accept(token)]
        self._keep([j for j, r in enumerate(running) if r.stream.finish is None])
        return events

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.running):
            return
        self.close()
        self.running = [self.running[j] for j in rows]
        self.logits = self.logits[rows] if rows else None

    def close(self) -> None:
        """Give every session its own state back (the batch holds views of them)."""
        if self.batch is not None:
            self.batch.close()
            self.batch = None
