"""The backend protocol: where an agent's session lives, and the local implementation.

An agent only ever calls these six methods, so a remote backend (an HTTP client of the
Ray Serve app) can replace `LocalBackend` without a caller changing. Every append and
generate carries its step number (1-based), so a backend that retries a lost request can
re-send it: the engine acknowledges a step it already applied, and re-sends a reply it
already generated, rather than doing either twice.

Sessions that do not exist (never created, or closed) raise a `KeyError`.
"""

from __future__ import annotations

from typing import Literal, Protocol, Sequence

from pydantic import BaseModel

from model.prompt import Piece
from serving.engine import Engine
from serving.types import SamplingParams, StepResult


class Generation(BaseModel):
    """One reply. `tokens` counts every token that joined the history, the ending one
    included (0 when the reply was already there and was re-sent); `length` is the
    history's length after it."""

    text: str
    finish_reason: Literal["eos", "stop", "length"]  # EOS, a stop string, max_new_tokens
    tokens: int
    length: int
    durable_step: int | None = None  # every step up to this one is in the checkpoint store


class Backend(Protocol):
    def create(self) -> str: ...

    def append(self, session: str, pieces: Sequence[Piece], step: int) -> StepResult: ...

    def generate(self, session: str, sampling: SamplingParams, step: int | None) -> Generation: ...

    def fork(self, session: str) -> str: ...

    def rollback(self, session: str, step: int) -> StepResult: ...

    def close(self, session: str) -> None: ...


class LocalBackend:
    """Sessions in an in-process `Engine`."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def create(self) -> str:
        return self.engine.create()

    def append(self, session: str, pieces: Sequence[Piece], step: int) -> StepResult:
        return self.engine.append(session, pieces, step=step)

    def generate(self, session: str, sampling: SamplingParams, step: int | None) -> Generation:
        events = list(self.engine.generate(session, sampling, step=step))
        last = events[-1]
        return Generation(
            text="".join(e.text for e in events), finish_reason=last.finish_reason or "length",
            tokens=last.tokens or 0, length=last.length or 0, durable_step=last.durable_step,
        )

    def fork(self, session: str) -> str:
        return self.engine.fork(session)

    def rollback(self, session: str, step: int) -> StepResult:
        return self.engine.rollback(session, step)

    def close(self, session: str) -> None:
        self.engine.close(session)
