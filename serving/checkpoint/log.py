"""One session's checkpoint log: what the request path captures and the writer writes.

Every state change a caller is told about becomes a ``Capture``: copies of the K/V rows
it added, the Mamba states and hidden row at its end, its tokens and the step-table
entries it changed. Copying is all the request path does (on CUDA into pinned host
memory, asynchronously); the writer thread encodes, appends and syncs.

Every ``snapshot_every`` records, the capture also carries the K/V rows since the last
snapshot, and the writer folds the log into a snapshot (a segment plus a point, see
``records``), starts a new log file and deletes what the snapshot made redundant. A
snapshot waits for a record that ends a step (a reply or a rollback), so that its point
is a rollback target; a session that only appends is folded after twice as many. So the
log stays short, and a restore reads the segments (every K/V row once) plus at most
``2 * snapshot_every`` records.

The snapshot chain after a rollback: a segment covers the rows from its ``base_length``
(rewinding the one before it) to its ``length``. A rollback to length ``L`` makes every
segment that starts at or after ``L`` dead; the next segment starts at ``L`` and chains
from the last live one.

Ownership: each engine that takes a session creates ``owner-<g>`` with the next
generation ``g``, exclusively. After every write the writer checks that its own owner
file is still there and that no ``owner-<g+1>`` exists; if another engine took over, the
write is not acknowledged and this engine stops serving the session (it is *fenced*).
A new owner never waits for a lease to run out.
"""

from __future__ import annotations

import collections
import dataclasses
from array import array
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from model.state import SessionState
from model.state_codec import kv_tensors, recurrent_tensors

from ..errors import SessionFencedError, StoreUnavailableError
from ..steps import StepTable
from .records import GENESIS, Item, PointMeta, RecordMeta, SegmentMeta, encode, read_frames
from .store import DirectoryStore

if TYPE_CHECKING:
    from .writer import CheckpointWriter

log = logging.getLogger(__name__)


class CheckpointPolicy(BaseModel):
    """How a session's log is written and compacted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    snapshot_every: int = Field(32, ge=1, le=1_000_000)  # records folded into a snapshot this often
    keep_points: int | None = Field(None, ge=1)  # rollback targets kept among snapshots (None: all); the newest always
    sync: bool = False  # every call waits until its record is durable, instead of streaming it
    max_queued: int = Field(32, ge=1)  # a session's records waiting for the store before its calls wait too


def owner_name(generation: int) -> str:
    return f"owner-{generation:010d}"


def log_name(generation: int, seq: int) -> str:
    return f"log-{generation:010d}-{seq:012d}"


def snapshot_names(seq: int, generation: int) -> tuple[str, str]:
    stem = f"snap-{seq:012d}-{generation:010d}"
    return f"{stem}.segment", f"{stem}.point"


@dataclass
class SnapshotRef:
    """A segment on the session's chain, and its point while it is a rollback target."""

    session: str  # whose it is: a fork's chain starts with its parent's
    seq: int
    digest: bytes
    base_length: int
    length: int
    step: int
    segment: str
    point: str | None


@dataclass(frozen=True)
class PointRef:
    """Where the state at the end of some step can be read back: a rollback target."""

    name: str
    offset: int
    digest: bytes
    kind: Literal["record", "point"]
    length: int


@dataclass
class Capture:
    """Copies of one state change, taken on the request path."""

    action: Literal["append", "generate", "rollback"]
    seq: int
    step: int  # the session's last step after the change
    first_step: int  # the step-table entries after this step changed
    base_length: int  # the history before the change, after any rewind
    length: int
    branch: bytes
    tensors: dict[str, torch.Tensor]  # K/V rows, Mamba states, hidden row, tokens, step entries
    snapshot: dict[str, torch.Tensor] | None = None  # K/V rows and tokens since the last snapshot, all steps
    snapshot_base: int = 0
    ready: torch.cuda.Event | None = None  # set when the device-to-host copies are done


@dataclass
class Fork:
    """A new session's log, starting from its parent's: the child's first snapshot."""

    parent: str
    capture: Capture
    parent_disk: "_WriterState | None" = None  # the parent's snapshots when it reached the fork


@dataclass
class ForkPoint:
    """In the parent's queue: hands the child the parent's snapshots as of the fork."""

    fork: Fork


@dataclass
class Close:
    pass


Job = Capture | Fork | ForkPoint | Close


def _copy(*groups: dict[str, torch.Tensor]) -> tuple[list[dict[str, torch.Tensor]], torch.cuda.Event | None]:
    """Contiguous host copies that later steps cannot change: pinned and asynchronous on
    CUDA, with one event that says when all of them are done."""
    out, event = [], None
    for tensors in groups:
        out.append({})
        for name, t in tensors.items():
            if t.device.type == "cuda":
                out[-1][name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                event = event or torch.cuda.Event()
            else:
                out[-1][name] = t.clone(memory_format=torch.contiguous_format)
    if event is not None:
        event.record()
    return out, event


def token_tensor(tokens: array, start: int, end: int) -> dict[str, torch.Tensor]:
    """Token ids ``start:end`` of a history (``array('i')``; images are ``IMAGE_TOKEN_INDEX``)."""
    ids = tokens[start:end]
    return {"tokens": torch.frombuffer(ids, dtype=torch.int32).clone() if ids else torch.empty(0, dtype=torch.int32)}


def _split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A snapshot's tensors as (segment: K/V rows, tokens, steps; point: Mamba states, hidden row)."""
    point = {k: v for k, v in tensors.items() if k.startswith("mamba.") or k == "hidden"}
    return {k: v for k, v in tensors.items() if k not in point}, point


def _mergeable(first: Capture, then: Capture) -> bool:
    """``then`` continues ``first``'s step (a reply after its observation), with no
    rollback or snapshot between them. Records of different steps never merge: each
    step's end stays a rollback target."""
    return (
        first.snapshot is None and then.action != "rollback" and then.step == first.step
        and then.base_length == first.length and then.branch == first.branch
    )


def _merge(first: Capture, then: Capture) -> Capture:
    """One record for both: their K/V rows and tokens, and ``then``'s step entries, Mamba
    states, hidden row, sequence number and snapshot."""
    a, b = first.tensors, then.tensors
    merged = {k: torch.cat([a[k], b[k]], dim=2) for k in b if k.startswith("kv.")}
    merged |= {k: v for k, v in b.items() if not k.startswith("kv.") and k != "tokens"}
    merged["tokens"] = torch.cat([a["tokens"], b["tokens"]])
    return dataclasses.replace(then, first_step=first.first_step, base_length=first.base_length, tensors=merged)


@dataclass
class _WriterState:
    """What the log on disk holds, as the writer (or a reader replaying it) goes: the last
    item, the live snapshot chain, and where the state at each history length can be
    read back (the rollback targets). Saved before a batch, put back if it fails."""

    prev: bytes = GENESIS
    chain: list[SnapshotRef] = dataclasses.field(default_factory=list)
    points: dict[int, PointRef] = dataclasses.field(default_factory=dict)  # history length -> its state

    def copy(self) -> "_WriterState":
        return _WriterState(self.prev, [dataclasses.replace(r) for r in self.chain], dict(self.points))

    def add_record(self, name: str, offset: int, digest: bytes, length: int, rollback: bool) -> None:
        if rollback:  # snapshots past the rollback are no longer on this history
            for ref in self.chain:
                if ref.length > length:
                    ref.point = None
        self.points = {n: p for n, p in self.points.items() if n < length}
        self.points[length] = PointRef(name, offset, digest, "record", length)
        self.prev = digest

    def add_snapshot(self, ref: SnapshotRef, point_digest: bytes | None) -> None:
        """A new segment: those wholly after its base are dead, and the log's records go."""
        self.chain = [r for r in self.chain if r.base_length < ref.base_length] + [ref]
        self.points = {n: p for n, p in self.points.items() if p.kind == "point" and n < ref.length}
        if ref.point is not None and point_digest is not None:
            self.points[ref.length] = PointRef(ref.point, 0, point_digest, "point", ref.length)
        self.prev = ref.digest


class SessionLog:
    """The log of one session, owned by this engine at ``generation``.

    The request path (holding the session's lock) calls ``capture``, ``fork``, ``close``
    and reads ``durable_step``; the writer thread calls ``begin``, ``sync_file`` and
    ``finish``, so that it can write many sessions before it syncs them. The request
    path's counters and the writer's ``_WriterState`` are each touched by one side only;
    the queue between them is guarded by ``_cond``.
    """

    def __init__(
        self,
        store: DirectoryStore,
        writer: "CheckpointWriter",
        session: str,
        generation: int,
        model: str,
        layout: dict,
        policy: CheckpointPolicy,
    ):
        self.store, self.writer, self.session, self.generation = store, writer, session, generation
        self.model, self.layout, self.policy = model, layout, policy
        self._cond = threading.Condition()
        self._jobs: collections.deque[Job] = collections.deque()  # not yet durable, oldest first
        self._pending: collections.deque[tuple[int, int]] = collections.deque()  # (seq, step) of those jobs
        self.error: BaseException | None = None  # the last write failure, until a retry succeeds
        self.fenced = False
        # request path
        self.next_seq = 1
        self.recorded = 0  # history the records cover: where the next one starts
        self.chain_length = 0  # history the snapshot chain covers
        self.since_snapshot = 0  # records since the last snapshot
        self.branch = GENESIS
        # writer thread
        self.disk = _WriterState()
        self._file: IO[bytes] | None = None
        self._file_name: str | None = None
        self._file_size = 0
        self._torn: tuple[str | None, int] | None = None  # a file a failed batch wrote into, and its size before
        self._taken = 0  # queued jobs the writer is writing now (guarded by _cond)
        self._batch: tuple = ()  # those jobs, and what to put back if they fail

    # ================================================================ request path
    def capture(
        self,
        action: Literal["append", "generate", "rollback"],
        state: SessionState,
        tokens: array,
        steps: StepTable,
        first_step: int,
        base_length: int | None = None,
    ) -> Capture:
        """Copy the change since the last record (or, for a rollback, from its target
        ``base_length``) to the state's length, and queue it for the writer."""
        base_length = self.recorded if base_length is None else base_length
        if action == "rollback":
            self.branch = secrets.token_bytes(32)
            self.chain_length = min(self.chain_length, base_length)
        tensors = kv_tensors(state, base_length) | recurrent_tensors(state) | token_tensor(tokens, base_length, state.length)
        tensors |= steps.to_tensors(first_step)
        self.since_snapshot += 1
        snapshot_base, snapshot = self.chain_length, {}
        every = self.policy.snapshot_every
        if self.since_snapshot >= every and (action != "append" or self.since_snapshot >= 2 * every):
            snapshot = kv_tensors(state, snapshot_base) | token_tensor(tokens, snapshot_base, state.length) | steps.to_tensors()
            self.since_snapshot, self.chain_length = 0, state.length
        (copies, snapshot), ready = _copy(tensors, snapshot)
        job = Capture(
            action, self.next_seq, steps.last, first_step, base_length, state.length, self.branch, copies,
            snapshot or None, snapshot_base, ready=ready,
        )
        self.next_seq += 1
        self.recorded = state.length
        self._submit(job, (job.seq, job.step))
        return job

    def fork(self, child: "SessionLog", state: SessionState, tokens: array, steps: StepTable) -> None:
        """Start ``child``'s log from this one: the parent's snapshots are shared (hard
        links on a local disk), and the child's first snapshot holds the rest."""
        base = self.chain_length
        tensors = kv_tensors(state, base) | recurrent_tensors(state) | token_tensor(tokens, base, state.length)
        (copies,), ready = _copy(tensors | steps.to_tensors())
        child.next_seq, child.branch = self.next_seq, secrets.token_bytes(32)
        capture = Capture(
            "append", child.next_seq, steps.last, 0, base, state.length, child.branch, {}, copies, base, ready=ready,
        )
        child.next_seq += 1
        child.chain_length = child.recorded = state.length
        fork = Fork(self.session, capture)
        self._submit(ForkPoint(fork), None)
        child._submit(fork, (capture.seq, capture.step))

    def close(self) -> None:
        self._submit(Close(), None)

    def _submit(self, job: Job, pending: tuple[int, int] | None) -> None:
        """Queue a job. A reply's record that the writer has not started on yet merges into
        its step's observation record: one write of the step's Mamba states instead of two.
        Past ``max_queued`` waiting jobs the call waits for the writer (backpressure), so a
        store slower than the steps slows them instead of filling memory."""
        with self._cond:
            last = self._jobs[-1] if len(self._jobs) > self._taken else None
            if isinstance(job, Capture) and isinstance(last, Capture) and _mergeable(last, job):
                self._jobs[-1] = _merge(last, job)
            else:
                self._cond.wait_for(lambda: len(self._jobs) < self.policy.max_queued or self.error is not None or self.fenced)
                self._jobs.append(job)
            if pending is not None:
                self._pending.append(pending)
        self.writer.wake(self)

    def durable_step(self, last_step: int) -> int:
        """Every step up to this one is durable."""
        with self._cond:
            return min((step for _, step in self._pending), default=last_step + 1) - 1

    @property
    def idle(self) -> bool:
        """Nothing waits to be written: the store holds all of this session."""
        with self._cond:
            return not self._jobs and self.error is None

    def wait(self, timeout: float | None = None) -> None:
        """Block until every record so far is durable; raise if the store refused one."""
        with self._cond:
            self._cond.wait_for(lambda: not self._jobs or self.error is not None or self.fenced, timeout)
            self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.fenced:
            raise SessionFencedError(f"session {self.session[:8]}… was taken over by another engine")
        if self.error is not None:
            raise StoreUnavailableError(
                f"the checkpoint store cannot write session {self.session[:8]}…: {self.error}; "
                "the session is unchanged in memory: retry when the store is writable"
            ) from self.error

    def retry(self, timeout: float | None = None) -> None:
        """Write again what failed, and wait for it."""
        with self._cond:
            self.error = None
        self.writer.wake(self)
        self.wait(timeout)

    def owned(self) -> bool:
        """Whether this engine still owns the session: its owner file is there and no later one."""
        if not self.fenced and (
            not self.store.exists(self.session, owner_name(self.generation))
            or self.store.exists(self.session, owner_name(self.generation + 1))
        ):
            with self._cond:
                self.fenced = True
                self._cond.notify_all()
        return not self.fenced

    # ================================================================ writer thread
    def begin(self) -> bool:
        """Take the queued jobs and write them, without syncing; False if there was nothing
        to write or the write failed. A failure undoes the batch, and ``retry`` writes it
        again into a clean file."""
        with self._cond:
            if self.error is not None or self.fenced or not self._jobs:
                return False
            jobs = list(self._jobs)
            self._taken = len(jobs)  # later captures no longer merge into these
        self._batch = (jobs, self.disk.copy(), (self._file_name, self._file_size), time.perf_counter())
        try:
            for job in jobs:
                self._run(job)
        except Exception as exc:  # a full or read-only store, or a bug: either way, nothing is acknowledged
            self.finish(exc)
            return False
        return True

    def sync_file(self) -> Exception | None:
        """Make the batch's appends durable (thread-safe: the writer syncs many sessions at once)."""
        try:
            if self._file is not None:
                self.store.sync(self._file)
        except Exception as exc:
            return exc
        return None

    def finish(self, error: Exception | None) -> None:
        """Acknowledge the batch if it was written and we still own the session."""
        jobs, saved, file_before, start = self._batch
        stats = self.writer.stats
        if error is not None:
            log.error("checkpoint store: cannot write session %s…: %s", self.session[:8], error,
                      exc_info=(type(error), error, error.__traceback__) if not isinstance(error, OSError) else None)
            stats.failures += 1
            self.disk = saved
            if self._file is not None:  # a retry appending to this file first cuts what this batch wrote
                self._torn = (self._file_name, file_before[1] if file_before[0] == self._file_name else 0)
            self._close_file()
        else:
            stats.syncs += self._file is not None
            stats.busy_s += time.perf_counter() - start
        owned = error is None and (isinstance(jobs[-1], Close) or self.owned())
        with self._cond:
            self._taken = 0
            self.error = error
            if owned:
                for _ in jobs:
                    self._jobs.popleft()
                done = max((j.seq if isinstance(j, Capture) else j.capture.seq for j in jobs if isinstance(j, (Capture, Fork))), default=0)
                while self._pending and self._pending[0][0] <= done:
                    self._pending.popleft()
            self._cond.notify_all()

    def _run(self, job: Job) -> None:
        if isinstance(job, Close):
            self._close_file()
            self.store.delete_session(self.session)
            return
        if isinstance(job, ForkPoint):
            job.fork.parent_disk = self.disk.copy()
            return
        capture = job.capture if isinstance(job, Fork) else job
        if capture.ready is not None:
            capture.ready.synchronize()
        if isinstance(job, Fork):
            self._start_fork(job)
            return
        self._append_record(job)
        if job.snapshot is not None:
            self._write_snapshot(job, job.snapshot | _split(job.tensors)[1])
            self._close_file()
            self._collect_garbage()

    def _meta(self, seq: int) -> dict:
        return {"session": self.session, "seq": seq, "generation": self.generation, "model": self.model, "layout": self.layout}

    def _append_record(self, c: Capture) -> None:
        meta = RecordMeta(
            **self._meta(c.seq), prev=self.disk.prev, action=c.action, branch=c.branch,
            base_length=c.base_length, length=c.length, first_step=c.first_step, step=c.step,
        )
        frame, digest = encode("record", meta, c.tensors, self.store.key)
        if self._file is None:
            self._open_file(log_name(self.generation, c.seq))
        offset = self._file_size
        self._file.write(frame)
        self._file_size += len(frame)
        self.writer.stats.records += 1
        self.writer.stats.bytes += len(frame)
        self.disk.add_record(self._file_name, offset, digest, c.length, c.action == "rollback")

    def _open_file(self, name: str) -> None:
        """Append to ``name``; after a failed batch, first cut off what it left there."""
        size = 0  # a torn frame at the end of another file is simply where that file ends
        if self._torn is not None and self._torn[0] == name:
            size = self._torn[1]
            self.store.truncate(self.session, name, size)
        self._torn = None
        self._file, self._file_name, self._file_size = self.store.open_append(self.session, name), name, size

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None

    def _write_snapshot(self, c: Capture, tensors: dict[str, torch.Tensor]) -> None:
        """Write a segment (from ``c.snapshot_base`` to ``c.length``) and its point."""
        live = [ref for ref in self.disk.chain if ref.base_length < c.snapshot_base]
        prev = live[-1] if live else None
        segment_name, point_name = snapshot_names(c.seq, self.generation)
        segment, point = _split(tensors)
        meta = SegmentMeta(
            **self._meta(c.seq), prev=prev.digest if prev else GENESIS, branch=c.branch,
            base_length=c.snapshot_base, length=c.length,
            forked_from=prev.session if prev and prev.session != self.session else None,
        )
        frame, digest = encode("segment", meta, segment, self.store.key)
        self.store.write_atomic(self.session, segment_name, frame)
        point_meta = PointMeta(**self._meta(c.seq), prev=digest, segment=digest, length=c.length, step=c.step)
        point_frame, point_digest = encode("point", point_meta, point, self.store.key)
        self.store.write_atomic(self.session, point_name, point_frame)
        self.writer.stats.snapshots += 1
        self.writer.stats.bytes += len(frame) + len(point_frame)
        ref = SnapshotRef(self.session, c.seq, digest, c.snapshot_base, c.length, c.step, segment_name, point_name)
        self.disk.add_snapshot(ref, point_digest)

    def _collect_garbage(self) -> None:
        """After a snapshot: delete the log files, dead segments, points past the policy
        and older owners' files. Best effort: what stays is ignored by readers."""
        disk, keep = self.disk, self.policy.keep_points
        for ref in disk.chain[: -keep if keep else 0]:
            ref.point = None
        live = {ref.segment for ref in disk.chain} | {ref.point for ref in disk.chain if ref.point}
        disk.points = {n: p for n, p in disk.points.items() if p.name in live}
        try:
            dead = [
                name
                for name in self.store.files(self.session)
                if name.startswith("log-")
                or (name.startswith("snap-") and name not in live)
                or (name.startswith("owner-") and name < owner_name(self.generation))
            ]
            self.store.delete(self.session, dead)
        except OSError as exc:
            log.warning("checkpoint store: could not clean up session %s…: %s", self.session[:8], exc)

    def _start_fork(self, job: Fork) -> None:
        if job.parent_disk is None:  # the parent's log has not reached the fork: it failed to write
            raise OSError(f"the parent session {job.parent[:8]}… must be written first")
        disk = job.parent_disk.copy()
        disk.chain = [ref for ref in disk.chain if ref.base_length < job.capture.snapshot_base]  # live at the fork
        for ref in disk.chain:
            for name in (ref.segment, ref.point):
                if name is not None and not self.store.exists(self.session, name):
                    self.store.link(job.parent, name, self.session)
        disk.points = {n: p for n, p in disk.points.items() if p.kind == "point"}
        self.disk = disk
        self._write_snapshot(job.capture, job.capture.snapshot)


def read_point(store: DirectoryStore, session: str, ref: PointRef) -> Item:
    """The item a ``PointRef`` names, checked against the digest recorded for it."""
    size = store.files(session).get(ref.name, 0)
    with store.open_read(session, ref.name) as f:
        f.seek(ref.offset)
        item = next(read_frames(f, size - ref.offset, ref.kind, store.key))
    if item.digest != ref.digest:
        raise ValueError(f"{ref.name} does not hold the state recorded there")
    return item
