"""The background thread that writes every session's log, off the request path.

Sessions with something to write are queued; the thread takes one, writes all its
waiting records with a single sync at the end (group commit), acknowledges them, and
moves on. One thread per engine keeps each session's records in order.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

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
    def __init__(self) -> None:
        self.stats = WriterStats()
        self._queue: queue.Queue[SessionLog | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self, log: SessionLog) -> None:
        """``log`` has jobs waiting."""
        self._queue.put(log)

    def _run(self) -> None:
        while (log := self._queue.get()) is not None:
            log.write_pending()

    def close(self) -> None:
        """Finish what is queued, then stop."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
