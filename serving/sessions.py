"""Sessions and where they live: in memory while in use, in the checkpoint store always.

A ``Session`` is one history: its model state, its step table and token ids, a lock (a
session takes one request at a time) and, with a store, its checkpoint log. The
``SessionTable`` finds a session by id. One that is not in memory but is in the store is
restored there under the same id (taking it over from whichever engine had it); one in
memory that another engine has taken over is dropped and taken back the same way.

With a store, memory is a cache: past ``max_sessions`` sessions or ``max_resident_bytes``,
the least recently used idle sessions whose log is fully durable are dropped from
memory, and the next call restores them without the caller noticing.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

from model.state import SessionState

from .checkpoint import CheckpointPolicy, CheckpointWriter, DirectoryStore, SessionLog, check_session_id, claim, restore
from .errors import SessionBusyError, SessionFencedError, StoreUnavailableError, UnknownSessionError
from .steps import StepTable

log = logging.getLogger(__name__)
EVICT_WAIT_S = 30.0  # how long a full budget waits for the writer to make the oldest session durable


@dataclass
class Session:
    id: str
    state: SessionState
    steps: StepTable = field(default_factory=StepTable)
    tokens: array = field(default_factory=lambda: array("i"))  # one id per history position; images are IMAGE_TOKEN_INDEX
    log: SessionLog | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    resident_nbytes: int = 0  # what its state took in memory when last released (the budget's unit)

    def record(self, action: Literal["append", "generate", "rollback"], first_step: int, base: int | None = None) -> None:
        """Log the change since the last record (or, for a rollback, from ``base``)."""
        if self.log is not None:
            self.log.capture(action, self.state, self.tokens, self.steps, first_step, base)

    def measure(self) -> None:
        """Note what the state takes now; the budget sums these rather than walking every state."""
        self.resident_nbytes = self.state.resident_nbytes

    @property
    def durable_step(self) -> int | None:
        """Every step up to this one is durable, reply included. The last step counts only
        once its reply has finished: a client that re-sends every later step (observation,
        then generation) loses nothing and repeats nothing."""
        if self.log is None:
            return None
        last = self.steps.last
        complete = last if last == 0 or self.steps.finish[last] is not None else last - 1
        return min(self.log.durable_step(last), complete)


class SessionTable:
    def __init__(
        self,
        new_state: Callable[[], SessionState],
        *,
        store: DirectoryStore | None = None,
        policy: CheckpointPolicy | None = None,
        model: str = "",
        layout: dict | None = None,
        max_sessions: int = 1024,
        max_resident_bytes: int | None = None,
    ):
        if max_resident_bytes is not None and store is None:
            raise ValueError("max_resident_bytes needs a checkpoint store to evict sessions to")
        self.new_state, self.store, self.policy = new_state, store, policy or CheckpointPolicy()
        self.model, self.layout = model, layout or {}
        self.max_sessions, self.max_resident_bytes = max_sessions, max_resident_bytes
        self.writer = CheckpointWriter() if store is not None else None
        self._resident: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._restoring = threading.Lock()

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self._resident)

    def is_resident(self, session: str) -> bool:
        return session in self._resident

    def resident(self) -> list[Session]:
        with self._lock:
            return list(self._resident.values())

    def get(self, session: str) -> Session:
        """The session, restored from the store if it is not in memory (no lock taken)."""
        with self._lock:
            s = self._resident.get(session) if isinstance(session, str) else None
            if s is not None:
                self._resident.move_to_end(session)
                return s
        return self._restore(session)

    @contextlib.contextmanager
    def hold(self, session: str) -> Iterator[Session]:
        """The session, locked for one request; then the memory budget is enforced."""
        with self.hold_all([session]) as held:
            yield held[0]

    @contextlib.contextmanager
    def hold_all(self, sessions: Sequence[str]) -> Iterator[list[Session]]:
        held: list[Session] = []
        try:
            for session in sessions:
                held.append(self._acquire(session))
            yield held
        finally:
            for s in held:
                s.measure()
                s.lock.release()
            self.enforce_budget()

    def _acquire(self, session: str) -> Session:
        while True:
            s = self.get(session)
            if not s.lock.acquire(blocking=False):
                raise SessionBusyError(f"session {session[:8]}… is busy with another request")
            with self._lock:
                current = self._resident.get(session)
            if current is not s:  # evicted or taken back while we waited for the lock: look again
                s.lock.release()
                continue
            if s.log is None:
                return s
            try:
                if s.log.error is not None:
                    s.log.retry(timeout=EVICT_WAIT_S)
                if s.log.owned():
                    return s
            except BaseException:
                s.lock.release()
                raise
            log.warning("session %s… was taken over by another engine; taking it back", session[:8])
            self._drop(s)
            s.lock.release()

    # ------------------------------------------------------------------ create, fork, close
    def create(self) -> Session:
        session = Session(secrets.token_urlsafe(18), self.new_state())  # 144 random bits: unguessable
        if self.store is not None:
            self.store.create_session(session.id)
            session.log = self._new_log(session.id, claim(self.store, session.id))
        self._insert(session)
        return session

    def fork(self, parent: Session) -> Session:
        child = Session(secrets.token_urlsafe(18), parent.state.fork(), parent.steps.copy(), array("i", parent.tokens))
        if parent.log is not None:
            self.store.create_session(child.id)
            child.log = self._new_log(child.id, claim(self.store, child.id))
            parent.log.fork(child.log, child.state, child.tokens, child.steps)
        self._insert(child)
        return child

    def close(self, session: str) -> None:
        """Forget the session here and in the store."""
        with self._lock:
            s = self._resident.get(session) if isinstance(session, str) else None
        if s is None:
            if self.store is None or not self.store.has(check_session_id(session)):
                raise UnknownSessionError(f"unknown session {str(session)[:64]!r}")
            self.store.delete_session(session)
            return
        if not s.lock.acquire(blocking=False):
            raise SessionBusyError(f"session {session[:8]}… is busy with another request")
        try:
            self._drop(s)
            if s.log is not None:
                s.log.close()
        finally:
            s.lock.release()

    def _insert(self, s: Session) -> None:
        s.measure()
        with self._lock:
            if self.store is None and len(self._resident) >= self.max_sessions:
                raise RuntimeError(f"the engine holds its maximum of {self.max_sessions} sessions; close some first")
            self._resident[s.id] = s
        self.enforce_budget()

    def _new_log(self, session: str, generation: int) -> SessionLog:
        return SessionLog(self.store, self.writer, session, generation, self.model, self.layout, self.policy)

    # ------------------------------------------------------------------ restore and evict
    def _restore(self, session: str) -> Session:
        if self.store is None:
            raise UnknownSessionError(f"unknown session {str(session)[:64]!r}")
        check_session_id(session)
        with self._restoring:
            with self._lock:
                if (s := self._resident.get(session)) is not None:
                    return s
            r = restore(self.store, session, self.model, self.new_state)
            s = Session(session, r.state, r.steps, r.tokens, self._new_log(session, r.generation))
            s.log.disk, s.log.next_seq, s.log.branch = r.disk, r.next_seq, r.branch
            s.log.chain_length, s.log.since_snapshot, s.log.recorded = r.chain_length, r.since_snapshot, r.state.length
            log.info(
                "restored session %s… at step %d (%d tokens, %d items) in %.3f s",
                session[:8], r.steps.last, r.state.length, r.items, r.seconds,
            )
            s.measure()
            with self._lock:
                self._resident[session] = s
        self.enforce_budget()
        return s

    def _drop(self, s: Session) -> None:
        with self._lock:
            if self._resident.get(s.id) is s:
                del self._resident[s.id]

    def resident_bytes(self) -> int:
        return sum(s.resident_nbytes for s in self.resident())

    def _over_budget(self) -> bool:
        if len(self._resident) > self.max_sessions:
            return True
        return self.max_resident_bytes is not None and self.resident_bytes() > self.max_resident_bytes

    def enforce_budget(self) -> None:
        """Evict least recently used idle sessions until within budget (only with a store)."""
        if self.store is None:
            return
        while self._over_budget():
            if not self._evict_one():
                return  # all in use, or the store is not keeping up: keep them rather than lose them

    def _evict_one(self) -> bool:
        """Drop the least recently used session that is idle and durable (or was taken
        over by another engine); False if none can go."""
        candidates = self.resident()
        for attempt in range(2):
            for s in candidates:
                if s.lock.acquire(blocking=False):
                    try:
                        if s.log.idle or s.log.fenced:
                            self._drop(s)
                            return True
                    finally:
                        s.lock.release()
            if attempt == 0 and candidates:  # the writer may only be behind: give it a moment
                with contextlib.suppress(StoreUnavailableError, SessionFencedError):
                    candidates[0].log.wait(timeout=EVICT_WAIT_S)
        return False

    def shutdown(self) -> None:
        """Wait for every log to be written, then stop the writer."""
        if self.writer is not None:
            self.writer.close()
