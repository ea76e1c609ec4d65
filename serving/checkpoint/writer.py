"""The background thread that writes every session's log, off the request path.

Sessions with something to write are queued. The thread takes every session waiting,
writes each one's queued records, then syncs all of them at once (group commit: the
syncs run in parallel, so the disk can fold them into one flush), acknowledges them, and
goes back for more. One thread per engine keeps each session's records in order.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from .log import SessionLog


@dataclass
class WriterStats:
    """What the writer has done, for metrics and benchmarks (updated by its thread only)."""

    records: int = 0
    snapshots: int = 0
    bytes: int = 0  # frames written: records, segments and points
    syncs: int = 0
    busy_s: float = 0.0  # time spent writing and syncing
    failures: int = 0


class CheckpointWriter:
    def __init__(self, sync_threads: int = 8) -> None:
        self.stats = WriterStats()
        self._open = threading.Event()  # cleared while held
        self._open.set()
        self._queue: queue.Queue[SessionLog | None] = queue.Queue()
        self._syncs = ThreadPoolExecutor(sync_threads, thread_name_prefix="checkpoint-sync")
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wake(self, log: SessionLog) -> None:
        """``log`` has jobs waiting."""
        self._queue.put(log)

    def _run(self) -> None:
        while True:
            waiting, stop = self._take()
            written = [log for log in waiting if log.begin()]
            for log, error in zip(written, self._syncs.map(SessionLog.sync_file, written)):
                log.finish(error)
            if stop:
                return

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Writes wait until the block ends (a maintenance window; benchmarks use it to
        build a backlog). Records queued meanwhile merge, per session."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def _take(self) -> tuple[list[SessionLog], bool]:
        """Every session waiting now (the first wait blocks), in the order they asked, and
        whether ``close`` was called."""
        first = self._queue.get()
        self._open.wait()
        waiting = {} if first is None else {id(first): first}
        stop = first is None
        while True:
            try:
                log = self._queue.get_nowait()
            except queue.Empty:
                return list(waiting.values()), stop
            if log is None:
                stop = True
            else:
                waiting.setdefault(id(log), log)

    def close(self) -> None:
        """Finish what is queued, then stop."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._syncs.shutdown()
