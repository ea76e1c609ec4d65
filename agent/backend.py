"""The backend protocol: where an agent's session lives, and the local implementation.

An agent only ever calls these six methods, so a remote backend (an HTTP client of the
Ray Serve app) can replace `LocalBackend` without a caller changing. Every append carries
its step number (1-based), so a backend that retries a lost request can re-send it and the
engine acknowledges, rather than repeats, a step it already applied.

Sessions that do not exist (never created, or closed) raise a `KeyError`.
"""

from __future__ import annotations

from typing import Literal, Protocol, Sequence

from pydantic import BaseModel

from model.prompt import Piece
from serving.engine import Engine, StepResult
from serving.sampling import SamplingParams


class Generation(BaseModel):
    """One reply. `tokens` counts every token that joined the history, the ending one
    included; `length` is the history's length after it."""

    text: str
    finish_reason: Literal["eos", "stop", "length"]  # EOS, a stop string, max_new_tokens
    tokens: int
    length: int


class Backend(Protocol):
    def create(self) -> str: ...

    def append(self, session: str, pieces: Sequence[Piece], step: int) -> StepResult: ...

    def generate(self, session: str, sampling: SamplingParams) -> Generation: ...

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

    def generate(self, session: str, sampling: SamplingParams) -> Generation:
        before = self.engine.session_info(session).length
        text, finish = self.engine.generate_text(session, sampling)
        after = self.engine.session_info(session).length
        return Generation(text=text, finish_reason=finish, tokens=after - before, length=after)

    def fork(self, session: str) -> str:
        return self.engine.fork(session)

    def rollback(self, session: str, step: int) -> StepResult:
        return self.engine.rollback(session, step)

    def close(self, session: str) -> None:
        self.engine.close(session)
