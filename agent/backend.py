"""The backend protocol: where an agent's session lives, and the local implementation.

An agent only ever calls these seven methods, so a remote backend (an HTTP client of the
Ray Serve app) can replace `LocalBackend` without a caller changing. `step` is an append
and then its reply's generation, in one call (one request for a remote backend);
`append_then_generate` is that for any backend, from its `append` and `generate`. Every
append and generate carries its step number (1-based), so a backend that retries a lost
request can re-send it: the engine acknowledges a step it already applied, and re-sends a
reply it already generated, rather than doing either twice.

Sessions that do not exist (never created, or closed) raise a `KeyError`. A reply is a
`serving.types.Generation`, the wire type a remote backend receives too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

from model.prompt import Piece
from serving.types import Generation, SamplingParams, StepReply, StepResult

if TYPE_CHECKING:  # the engine is passed in: a remote agent never imports torch
    from serving.engine import Engine


class Backend(Protocol):
    def create(self) -> str: ...

    def append(self, session: str, pieces: Sequence[Piece], step: int) -> StepResult: ...

    def generate(self, session: str, sampling: SamplingParams, step: int | None) -> Generation: ...

    def step(self, session: str, pieces: Sequence[Piece], step: int, sampling: SamplingParams) -> StepReply: ...

    def fork(self, session: str) -> str: ...

    def rollback(self, session: str, step: int) -> StepResult: ...

    def close(self, session: str) -> None: ...


class LocalBackend:
    """Sessions in an in-process `Engine`. (`agent.RemoteBackend` is the same protocol over HTTP.)"""

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
            replayed=last.replayed, token_ids=[e.token_id for e in events if e.token_id is not None],
        )

    def step(self, session: str, pieces: Sequence[Piece], step: int, sampling: SamplingParams) -> StepReply:
        return append_then_generate(self, session, pieces, step, sampling)

    def fork(self, session: str) -> str:
        return self.engine.fork(session)

    def rollback(self, session: str, step: int) -> StepResult:
        return self.engine.rollback(session, step)

    def close(self, session: str) -> None:
        self.engine.close(session)


def append_then_generate(backend: Backend, session: str, pieces: Sequence[Piece], step: int, sampling: SamplingParams) -> StepReply:
    """A step as two calls: the observation's append, then its reply under the same step number."""
    appended = backend.append(session, pieces, step)
    return StepReply(appended=appended, generation=backend.generate(session, sampling, step))
