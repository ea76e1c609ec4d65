"""The model thread: one thread runs every forward of an engine, in turns.

Each turn it takes the requests that callers withdrew out of the batch, runs at most one
waiting job (an append's encode and prefill: one chunk), lets the generations that arrived
join the decode loop, and decodes one token for every running generation. So generations
that start at different times, from different threads, share one forward per token
(continuous batching, as vLLM's scheduler interleaves prefill chunks with decode), and an
append holds the others' decoding back by one chunk at most.

Callers block on their own inbox meanwhile; the thread leaves after a second without work
and the next call starts it again, so an idle engine holds no thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Callable, Iterator, TypeVar

from .generation import DecodeLoop, Request
from .types import TokenEvent

log = logging.getLogger(__name__)
IDLE_EXIT_S = 1.0
T = TypeVar("T")


class _Job:
    def __init__(self, work: Callable[[], object]):
        self.work, self.done = work, threading.Event()
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # handed to the caller, which re-raises it
            self.error = exc
        finally:
            self.done.set()

    def wait(self) -> object:
        try:
            self.done.wait()
        except BaseException:  # interrupted: the job still touches the session, so wait it out
            self.done.wait()
            raise
        if self.error is not None:
            raise self.error
        return self.result


class Scheduler:
    def __init__(self, loop: DecodeLoop):
        self.loop = loop
        self._wake = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._arrivals: list[list[Request]] = []
        self._withdrawals: list[tuple[list[Request], threading.Event]] = []
        self._inbox: dict[Request, queue.SimpleQueue] = {}
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # what broke the thread itself, if anything did
        self.steps = self.decoded = 0  # decode forwards, and the tokens they produced

    @property
    def generating(self) -> int:
        return len(self.loop.running)

    # ------------------------------------------------------------------ callers' side
    def run(self, work: Callable[[], T]) -> T:
        """Run ``work`` (model compute for one session) on the model thread, between two
        decode steps; blocks until it is done and returns its result or raises its error."""
        job = _Job(work)
        self._submit(lambda: self._jobs.append(job))
        return job.wait()  # type: ignore[return-value]

    def decode(self, requests: list[Request]) -> Iterator[tuple[Request, TokenEvent]]:
        """Join the running generations; yields these requests' events as they come, until
        each has finished. Closing the iterator early withdraws the ones still running."""
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        running = set(requests)
        for r in requests:
            self._inbox[r] = inbox
        self._submit(lambda: self._arrivals.append(requests))
        try:
            while running:
                item = inbox.get()
                if isinstance(item, BaseException):
                    raise item
                for r, event in item:
                    if event.finish_reason is not None:
                        running.discard(r)
                    yield r, event
        finally:
            if running:
                withdrawn = threading.Event()
                self._submit(lambda: self._withdrawals.append((list(running), withdrawn)))
                withdrawn.wait()
            for r in requests:
                self._inbox.pop(r, None)

    def _submit(self, enqueue: Callable[[], None]) -> None:
        with self._wake:
            enqueue()
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="engine-model", daemon=True)
                self._thread.start()
            self._wake.notify()

    # ------------------------------------------------------------------ the model thread
    def _serve(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as exc:  # a bug here would leave every caller waiting: record it, fail them
            log.exception("the engine's model thread failed")
            self.failure = exc
            with self._wake:
                self._thread = None
                for inbox in set(self._inbox.values()):
                    inbox.put(exc)
                for job in self._jobs:
                    job.error = exc
                    job.done.set()
                for _, withdrawn in self._withdrawals:
                    withdrawn.set()
                self._jobs.clear()
                self._withdrawals.clear()

    def _turn(self) -> bool:
        """One turn; False when the thread should leave (no work for IDLE_EXIT_S)."""
        with self._wake:
            if not self._has_work() and not self._wake.wait_for(self._has_work, timeout=IDLE_EXIT_S):
                self._thread = None
                return False
            job = self._jobs.popleft() if self._jobs else None
            arrivals, self._arrivals = self._arrivals, []
            withdrawals, self._withdrawals = self._withdrawals, []
        for requests, withdrawn in withdrawals:
            self.loop.withdraw(requests)
            withdrawn.set()
        if job is not None:
            job.run()
        for requests in arrivals:
            self._admit(requests)
        if self.loop.running:
            self._step()
        return True

    def _has_work(self) -> bool:
        return bool(self._jobs or self._arrivals or self._withdrawals or self.loop.running)

    def _admit(self, requests: list[Request]) -> None:
        try:
            self.loop.admit(requests)
        except Exception as exc:
            self._inbox[requests[0]].put(exc)

    def _step(self) -> None:
        running = list(self.loop.running)
        try:
            events = self.loop.step()
            self.steps, self.decoded = self.steps + 1, self.decoded + len(running)
        except Exception as exc:  # the whole batch fails together; the loop goes on for new work
            self.loop.withdraw(running)
            for inbox in {self._inbox[r] for r in running}:
                inbox.put(exc)
            return
        by_inbox: dict[int, tuple[queue.SimpleQueue, list]] = {}
        for r, event in events:
            inbox = self._inbox[r]
            by_inbox.setdefault(id(inbox), (inbox, []))[1].append((r, event))
        for inbox, items in by_inbox.values():
            inbox.put(items)
