"""The Agent: one task's session on a backend, fed one observation per step.

    agent = Agent(LocalBackend(Engine()))
    agent.reset("Sign in with the code you are shown.")
    action = agent.step(Observation(screenshot, "Reply wait() to continue."))

The history stays in the backend's session, so a step sends only the new observation and
costs only its tokens, however long the episode. Each step appends its user turn with
its step number and generates the reply, in one backend call (`Backend.step`: one request
to a remote server), and parses it (`agent.actions.parse_action`): a reply that is not an
action becomes `wait()`, with the raw text kept in `records`.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from time import perf_counter

from serving.types import SamplingParams, StepReply

from .actions import Action, ParsedAction, parse_action
from .backend import Backend, append_then_generate
from .prompt import Observation, step_pieces


class NoSessionError(RuntimeError):
    """The agent has no session: `reset` was not called, or the agent was closed."""


@dataclass(frozen=True)
class StepRecord:
    step: int  # 1-based
    parsed: ParsedAction  # the action, the model's raw text, and why parsing failed, if it did
    finish_reason: str  # how the reply ended: "eos", "stop" or "length"
    observation_tokens: int  # what the append added to the history: the new observation alone
    generated_tokens: int
    length: int  # the session's history, in tokens, after the step
    timings: dict[str, float]  # seconds by phase: model_step_s (the observation's append and its reply), parse_s


class Agent:
    """One task at a time on one backend session; `records` says what each step did."""

    def __init__(self, backend: Backend, sampling: SamplingParams | None = None):
        self.backend = backend
        self.sampling = sampling or SamplingParams()
        self.instruction = ""
        self.session: str | None = None
        self.records: list[StepRecord] = []  # one per step taken in this session
        self._finalizer: weakref.finalize | None = None

    @property
    def steps(self) -> int:
        return len(self.records)

    def reset(self, instruction: str) -> None:
        """Starts a task on a new session; the previous one is closed. The instruction is
        sent with the first observation."""
        self.close()
        self._open(self.backend.create())
        self.instruction = instruction
        self.records = []

    def step(self, observation: Observation) -> Action:
        session = self._session()
        step = self.steps + 1
        pieces = step_pieces(
            observation,
            instruction=self.instruction if step == 1 else None,
            close_turn=bool(self.records) and self.records[-1].finish_reason != "eos",
        )
        tick = perf_counter()
        try:
            done = self._take_step(session, pieces, step)
        except BaseException:
            self.backend.rollback(session, step - 1)  # a step happens whole or not at all
            raise
        stepped_at = perf_counter()
        reply = done.generation
        parsed = parse_action(reply.text)
        timings = {"model_step_s": stepped_at - tick, "parse_s": perf_counter() - stepped_at}
        self.records.append(
            StepRecord(step, parsed, reply.finish_reason, done.appended.tokens, reply.tokens, reply.length, timings)
        )
        return parsed.action

    def _take_step(self, session: str, pieces: list, step: int) -> StepReply:
        """The backend's `step`; for a backend written before it, its append and generate."""
        if hasattr(self.backend, "step"):
            return self.backend.step(session, pieces, step, self.sampling)
        return append_then_generate(self.backend, session, pieces, step, self.sampling)

    def fork(self) -> "Agent":
        """An agent on a copy of this session, for search over actions: the two diverge
        from here, and this one is left as it is."""
        child = Agent(self.backend, self.sampling)
        child._open(self.backend.fork(self._session()))
        child.instruction = self.instruction
        child.records = list(self.records)
        return child

    def rollback(self, k: int = 1) -> None:
        """Undoes the last `k` steps: the session is as it was `k` steps ago."""
        if not 0 <= k <= self.steps:
            raise ValueError(f"cannot undo {k} steps: the agent has taken {self.steps}")
        self.backend.rollback(self._session(), self.steps - k)
        del self.records[self.steps - k :]

    def close(self) -> None:
        """Closes the session, if it is still open. An agent that is garbage-collected
        closes its own."""
        if self._finalizer is not None:
            self._finalizer()
        self._finalizer, self.session = None, None

    def _open(self, session: str) -> None:
        self.session = session
        self._finalizer = weakref.finalize(self, _close_if_open, self.backend, session)
        self._finalizer.atexit = False  # nothing to free when the whole process ends

    def _session(self) -> str:
        if self.session is None:
            raise NoSessionError("the agent has no session: call reset(instruction) first")
        return self.session


def _close_if_open(backend: Backend, session: str) -> None:
    with contextlib.suppress(KeyError):  # closed already, through the backend: nothing to free
        backend.close(session)
