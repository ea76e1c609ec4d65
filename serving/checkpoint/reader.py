"""Reading a session back from its log: take it over, find the newest intact state, replay.

1. **Take over.** Create ``owner-<g>`` with the next generation, exclusively. From then on
   the previous owner's writes are refused (``SessionLog.owned``), so everything it
   acknowledged as durable is already on disk and everything after is not acknowledged.
2. **Read and verify** every item: segments, points, and the frames of each log file up to
   the first torn or damaged one.
3. **Pick the head**: the newest item of this session (by owner generation, then sequence
   number) whose chain back to the start is whole. Items a stale owner wrote after a newer
   owner had started are never heads. Walking back, every item must name its predecessor's
   digest, carry a lower sequence number (a record that merged several changes skips the
   numbers it merged), keep the branch unless it is a rollback, and belong to this session,
   or, past a fork's first segment, to the parent it names.
4. **Replay** the chain from the start: segments append their K/V rows, records apply
   their deltas (a rollback rewinds first); a segment at the head takes its point's Mamba
   states. Any damage makes the candidate fail and the next older one is tried, so a
   damaged log restores to its last intact state, or fails with an error naming the
   session. It never yields a state that no prefix of the log had.
"""

from __future__ import annotations

import json
import logging
import re
import time
from array import array
from dataclasses import dataclass
from typing import Callable

import torch

from model.prompt import IMAGE_TOKEN_INDEX
from model.state import SessionState
from model.state_codec import apply_delta, apply_kv_rows, load_recurrent
from model.tensorpack import CorruptBlobError

from ..errors import SessionLogError, UnknownSessionError
from ..steps import StepTable
from .log import SnapshotRef, _WriterState, owner_name
from .records import GENESIS, Item, RecordMeta, SegmentMeta, TornFrame, read_frames
from .store import DirectoryStore

log = logging.getLogger(__name__)
_LOG_FILE = re.compile(r"^log-(\d{10})-(\d{12})$")
_SNAPSHOT = re.compile(r"^snap-(\d{12})-(\d{10})\.(segment|point)$")
_OWNER = re.compile(r"^owner-(\d{10})$")


@dataclass
class _Located:
    item: Item
    name: str
    offset: int


@dataclass
class Restored:
    state: SessionState
    steps: StepTable
    tokens: array
    generation: int  # the one this engine now owns
    disk: _WriterState
    next_seq: int
    chain_length: int
    since_snapshot: int
    branch: bytes
    items: int  # items replayed
    seconds: float


def claim(store: DirectoryStore, session: str) -> int:
    """Take the session over: the next owner generation, created exclusively."""
    while True:
        owners = [int(m.group(1)) for name in store.files(session) if (m := _OWNER.match(name))]
        generation = max(owners, default=0) + 1
        if store.create_exclusive(session, owner_name(generation), b""):
            return generation


def _read_all(store: DirectoryStore, session: str, files: dict[str, int]) -> tuple[dict[bytes, _Located], list[str]]:
    """Every verified item by digest, and what was damaged."""
    found: dict[bytes, _Located] = {}
    damage: list[str] = []
    for name, size in sorted(files.items()):
        if _LOG_FILE.match(name):
            kind = "record"
        elif m := _SNAPSHOT.match(name):
            kind = m.group(3)
        else:
            continue
        offset = 0
        try:
            with store.open_read(session, name) as f:
                for item in read_frames(f, size, kind, store.key):
                    found[item.digest] = _Located(item, name, offset)
                    offset += item.nbytes
        except TornFrame as exc:
            log.info("session %s…: %s ends in a torn frame (%s), dropped", session[:8], name, exc)
        except (CorruptBlobError, ValueError) as exc:
            damage.append(f"{name} at byte {offset}: {exc}")
        except FileNotFoundError:
            pass  # deleted by a compaction since the listing: a newer snapshot covers it
    return found, damage


def _owner_after(store: DirectoryStore, session: str, name: str) -> int | None:
    """The sequence number an owner restored up to, from its owner file (None if unknown)."""
    try:
        with store.open_read(session, name) as f:
            after = json.loads(f.read(256) or b"{}").get("after")
    except (OSError, ValueError, AttributeError):
        return None
    return after if isinstance(after, int) and after >= 0 else None


def _stale_bound(store: DirectoryStore, session: str, files: dict[str, int]) -> dict[int, int]:
    """Per owner generation, the first sequence number a later owner restored past or
    wrote: a stale owner's items from there on lie on an abandoned branch."""
    first: dict[int, int] = {}
    for name in files:
        if m := _LOG_FILE.match(name):
            generation, seq = int(m.group(1)), int(m.group(2))
        elif m := _SNAPSHOT.match(name):
            seq, generation = int(m.group(1)), int(m.group(2))
        elif (m := _OWNER.match(name)) and (after := _owner_after(store, session, name)) is not None:
            generation, seq = int(m.group(1)), after + 1
        else:
            continue
        first[generation] = min(first.get(generation, seq), seq)
    bound: dict[int, int] = {}
    for g in first:
        later = [s for h, s in first.items() if h > g]
        if later:
            bound[g] = min(later)
    return bound


def _chain(head: _Located, found: dict[bytes, _Located], session: str, model: str) -> list[_Located]:
    """The items from the start to ``head``, checked link by link; ValueError if broken."""
    chain, cur, owner = [head], head, session
    while True:
        meta = cur.item.meta
        if meta.session != owner:
            raise ValueError(f"seq {meta.seq} belongs to session {meta.session[:8]}…, not {owner[:8]}…")
        if meta.model != model:
            raise ValueError(f"seq {meta.seq} was written by another model")
        if isinstance(meta, SegmentMeta) and meta.forked_from is not None:
            owner = meta.forked_from
        if meta.prev == GENESIS:
            return chain[::-1]
        prev = found.get(meta.prev)
        if prev is None:
            raise ValueError(f"the item before seq {meta.seq} is missing or damaged")
        _check_link(meta, prev.item.meta, owner == meta.session)
        chain.append(prev)
        cur = prev


def _check_link(meta, prev, same_session: bool) -> None:
    is_record = isinstance(meta, RecordMeta)
    if not prev.seq < meta.seq:
        raise ValueError(f"seq {meta.seq} does not follow seq {prev.seq}")
    if same_session and prev.generation > meta.generation:
        raise ValueError(f"seq {meta.seq} of owner {meta.generation} follows a later owner's item")
    if not is_record and isinstance(prev, RecordMeta):
        raise ValueError(f"the segment at seq {meta.seq} follows a record")
    if is_record and meta.action != "rollback" and meta.branch != prev.branch:
        raise ValueError(f"seq {meta.seq} is on another branch than the item before it")


def _tokens(item: Item) -> array:
    ids = item.tensors.get("tokens")
    if ids is None or ids.dtype != torch.int32 or ids.ndim != 1:
        raise CorruptBlobError("item lacks its token ids")
    out = array("i", ids.numpy().tobytes())
    if any(t < 0 and t != IMAGE_TOKEN_INDEX for t in out):
        raise CorruptBlobError("item holds invalid token ids")
    return out


def _state_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model-state tensors of an item (not its tokens or step entries)."""
    return {k: v for k, v in tensors.items() if k.startswith(("kv.", "mamba.")) or k == "hidden"}


def _replay(chain: list[_Located], found: dict[bytes, _Located], new_state: Callable[[], SessionState]) -> Restored:
    state, steps, tokens, disk = new_state(), StepTable(), array("i"), _WriterState()
    chain_length = since = 0
    for loc in chain:
        item, meta = loc.item, loc.item.meta
        delta = {"base_length": meta.base_length, "length": meta.length, "layout": meta.layout}
        ids = _tokens(item)
        if len(ids) != meta.length - meta.base_length or meta.base_length > len(tokens):
            raise CorruptBlobError(f"seq {meta.seq}: its tokens do not match its lengths")
        if isinstance(meta, SegmentMeta):
            apply_kv_rows(state, _state_part(item.tensors), delta)
            steps.replace_from(0, item.tensors, meta.length)
            point = _point_of(found, item.digest)
            ref = SnapshotRef(
                meta.session, meta.seq, item.digest, meta.base_length, meta.length, steps.last, loc.name, point and point.name
            )
            disk.add_snapshot(ref, point and point.item.digest)
            chain_length, since = meta.length, 0
        else:
            apply_delta(state, _state_part(item.tensors), delta, rewind=True)
            steps.replace_from(meta.first_step, item.tensors, meta.length)
            if steps.last != meta.step:
                raise CorruptBlobError(f"seq {meta.seq}: its step entries do not end at step {meta.step}")
            if meta.action == "rollback":
                chain_length = min(chain_length, meta.length)
            disk.add_record(loc.name, loc.offset, item.digest, meta.length, meta.action == "rollback")
            since += 1
        del tokens[meta.base_length :]
        tokens.extend(ids)
    head = chain[-1].item
    if isinstance(head.meta, SegmentMeta):
        point = _point_of(found, head.digest)
        if point is None:
            raise ValueError(f"the snapshot at seq {head.meta.seq} has lost its point (its Mamba states)")
        load_recurrent(state, point.item.tensors)
    return Restored(
        state, steps, tokens, 0, disk, head.meta.seq + 1, chain_length, since, head.meta.branch, len(chain), 0.0
    )


def _point_of(found: dict[bytes, _Located], segment: bytes) -> _Located | None:
    for loc in found.values():
        if loc.item.kind == "point" and loc.item.meta.segment == segment:
            return loc
    return None


def _mark_owner(store: DirectoryStore, session: str, generation: int, after: int) -> None:
    """Write down where this owner took over, so a later reader knows that a stale
    owner's items past it are abandoned, even if this owner writes nothing more."""
    store.write_atomic(session, owner_name(generation), json.dumps({"after": after}).encode())


def restore(
    store: DirectoryStore, session: str, model: str, new_state: Callable[[], SessionState]
) -> Restored:
    """Take ``session`` over and rebuild it from its log (see the module docstring)."""
    start = time.perf_counter()
    if not store.has(session):
        raise UnknownSessionError(f"unknown session {session[:64]!r}")
    generation = claim(store, session)
    files = store.files(session)
    found, damage = _read_all(store, session, files)
    bound = _stale_bound(store, session, files)
    heads = [
        loc for loc in found.values()
        if loc.item.kind != "point" and loc.item.meta.session == session
        and loc.item.meta.seq < bound.get(loc.item.meta.generation, 1 << 62)
    ]
    heads.sort(key=lambda loc: (loc.item.meta.generation, loc.item.meta.seq), reverse=True)
    if heads and heads[0].item.meta.model != model:
        raise SessionLogError(f"session {session[:8]}… was written by another model ({heads[0].item.meta.model})")
    failures: list[str] = []
    for head in heads:
        try:
            restored = _replay(_chain(head, found, session, model), found, new_state)
        except (ValueError, KeyError) as exc:  # CorruptBlobError and StateMismatchError are ValueErrors
            failures.append(f"seq {head.item.meta.seq}: {exc}")
            continue
        if failures or damage:
            log.error(
                "session %s…: the log is damaged past step %d (%s); restored to step %d",
                session[:8], restored.steps.last, "; ".join(damage + failures[:3]), restored.steps.last,
            )
        restored.generation, restored.seconds = generation, time.perf_counter() - start
        _mark_owner(store, session, generation, restored.next_seq - 1)
        return restored
    if damage or failures:
        raise SessionLogError(
            f"session {session[:8]}… has no intact state in the checkpoint store: {'; '.join((damage + failures)[:3])}"
        )
    state = new_state()  # created, and nothing appended yet
    return Restored(state, StepTable(), array("i"), generation, _WriterState(), 1, 0, 0, GENESIS, 0, time.perf_counter() - start)
