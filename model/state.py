"""The recurrent session state: everything the model remembers of one session's history.

Per Mamba layer a fixed-size conv and SSM state; per attention layer an append-only K/V
cache; plus the token count. A step costs only its new tokens because ``prefill`` appends
onto this object instead of re-reading the history.

The state also keeps ``last_hidden``, the last position's output before the final norm:
the next token's logits are ``model.head(last_hidden)``, so a restored or rolled-back
session generates exactly what the live one would, from a few KB rather than a
vocabulary-sized row of logits.

Rollback needs the Mamba states as they were at the target length, which cannot be
recomputed backwards. ``snapshot()`` saves them with ``last_hidden`` (a few hundred KB to a
few tens of MB), and a bounded ring of snapshots is kept; K/V is simply truncated.
Serialisation lives in ``model.state_codec``.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import HybridLMConfig


@dataclass
class MambaLayerState:
    conv: torch.Tensor  # [1, d_inner, d_conv], model dtype: the last d_conv conv inputs
    ssm: torch.Tensor  # [1, d_inner, d_state], float32

    def clone(self) -> "MambaLayerState":
        return MambaLayerState(self.conv.clone(), self.ssm.clone())

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes


class _KVBuffer:
    """Preallocated K/V storage that several caches may share after a fork.

    ``filled`` is how far anyone has written. A cache may write in place when it is the
    only user, or when its own length equals ``filled`` (it is at the frontier, so no
    other user's rows can be overwritten). Otherwise it copies first: copy-on-write.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, filled: int):
        self.k, self.v, self.filled = k, v, filled
        self.users: weakref.WeakSet[KVCache] = weakref.WeakSet()

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class KVCache:
    """The K/V rows of one attention layer: ``[1, kv_heads, length, head_dim]`` each."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        empty = torch.empty(1, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self._attach(_KVBuffer(empty, empty.clone(), 0))
        self.length = 0

    def _attach(self, buffer: _KVBuffer) -> None:
        self._buf = buffer
        buffer.users.add(self)

    @property
    def k(self) -> torch.Tensor:
        return self._buf.k[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor:
        return self._buf.v[:, :, : self.length]

    @property
    def dtype(self) -> torch.dtype:
        return self._buf.k.dtype

    @property
    def device(self) -> torch.device:
        return self._buf.k.device

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def reserved_nbytes(self) -> int:
        """Bytes of the whole buffer this cache writes into, headroom included."""
        return self._buf.nbytes

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append rows and return the whole cache (views, no copy of the history)."""
        start = self.length
        self.claim(k.shape[2])
        self._buf.k[:, :, start : self.length] = k
        self._buf.v[:, :, start : self.length] = v
        return self.k, self.v

    def claim(self, n: int) -> bool:
        """Grow by ``n`` rows that the caller then writes at ``length - n ..``, in this
        cache's own buffer (moved first if it is too small or another cache's rows lie
        there). Returns whether the buffer moved. Claiming before writing is what lets a
        batched kernel write many caches at once: a fork that shares the buffer sees the
        claim and moves, instead of writing over the same rows."""
        end = self.length + n
        buf = self._buf
        shared = len(buf.users) > 1 and buf.filled != self.length
        moved = shared or end > buf.capacity
        if moved:
            self._reallocate(end)
        self._buf.filled = end
        self.length = end
        return moved

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole K and V storage, ``[1, kv_heads, capacity, head_dim]`` each, for kernels
        that index rows themselves."""
        return self._buf.k, self._buf.v

    def _reallocate(self, needed: int) -> None:
        """Move this cache's rows into a fresh buffer with room to grow: half again, at most
        64k rows, so a long session or a fork of one does not reserve gigabytes it never uses."""
        old = self._buf
        capacity = needed + min(max(needed // 2, 64), 65536)
        shape = (*old.k.shape[:2], capacity, old.k.shape[3])
        k = torch.empty(shape, dtype=old.k.dtype, device=old.k.device)
        v = torch.empty_like(k)
        k[:, :, : self.length] = old.k[:, :, : self.length]
        v[:, :, : self.length] = old.v[:, :, : self.length]
        old.users.discard(self)
        self._attach(_KVBuffer(k, v, self.length))

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a K/V cache of {self.length} rows to {length}")
        self.length = length

    def fork(self) -> "KVCache":
        """A cache that shares this one's rows until either side writes over the other's."""
        child = KVCache.__new__(KVCache)
        child._attach(self._buf)
        child.length = self.length
        return child

    def to(self, device: torch.device | str) -> "KVCache":
        moved = KVCache(self._buf.k.shape[1], self._buf.k.shape[3], self.dtype, device)
        moved.append(self.k.to(device), self.v.to(device))
        return moved


@dataclass(frozen=True)
class _Point:
    """What a rollback to some length restores besides truncating K/V."""

    mamba: dict[int, MambaLayerState]
    last_hidden: torch.Tensor | None


class SessionState:
    """One session's memory: Mamba states, K/V caches, the token count and the last hidden row.

    Create it with ``SessionState.empty(config)`` and grow it with the model's ``prefill``.
    """

    def __init__(
        self,
        mamba: dict[int, MambaLayerState],
        kv: dict[int, KVCache],
        length: int = 0,
        max_snapshots: int = 64,
        last_hidden: torch.Tensor | None = None,
        hidden_size: int = 0,
    ):
        self.mamba = mamba
        self.kv = kv
        self.length = length
        self.hidden_size = hidden_size
        self.last_hidden = last_hidden  # [1, hidden]: the last position's output before the final norm
        self.max_snapshots = max_snapshots
        self._snapshots: OrderedDict[int, _Point] = OrderedDict()
        self.in_decode_batch = False  # its Mamba states are slots of an open DecodeBatch

    @classmethod
    def empty(
        cls,
        config: HybridLMConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_snapshots: int = 64,
    ) -> "SessionState":
        mamba = {
            i: MambaLayerState(
                conv=torch.zeros(1, config.d_inner, config.mamba_d_conv, dtype=dtype, device=device),
                ssm=torch.zeros(1, config.d_inner, config.mamba_d_state, dtype=torch.float32, device=device),
            )
            for i in config.mamba_layers
        }
        kv = {
            i: KVCache(config.num_key_value_heads, config.head_dim, dtype, device) for i in config.attention_layers
        }
        return cls(mamba, kv, 0, max_snapshots, hidden_size=config.hidden_size)

    # ---------------------------------------------------------------- size and placement
    @property
    def nbytes(self) -> int:
        """Bytes of live state: K/V rows in use, Mamba states and the last hidden row (snapshots excluded)."""
        hidden = 0 if self.last_hidden is None else self.last_hidden.nbytes
        return sum(c.nbytes for c in self.kv.values()) + sum(m.nbytes for m in self.mamba.values()) + hidden

    @property
    def snapshot_nbytes(self) -> int:
        return sum(m.nbytes for p in self._snapshots.values() for m in p.mamba.values())

    @property
    def resident_nbytes(self) -> int:
        """What keeping this state costs in memory: whole K/V buffers (headroom included,
        a shared buffer counted in full), Mamba states, snapshots and the hidden row."""
        kv = sum(c.reserved_nbytes - c.nbytes for c in self.kv.values())
        return self.nbytes + kv + self.snapshot_nbytes

    @property
    def device(self) -> torch.device:
        first = next(iter(self.mamba.values()), None)
        return first.ssm.device if first is not None else next(iter(self.kv.values())).device

    def to(self, device: torch.device | str) -> "SessionState":
        """A copy of this state on ``device`` (snapshots included)."""

        def move(p: _Point) -> _Point:
            hidden = None if p.last_hidden is None else p.last_hidden.to(device)
            return _Point({i: MambaLayerState(m.conv.to(device), m.ssm.to(device)) for i, m in p.mamba.items()}, hidden)

        live = move(_Point(self.mamba, self.last_hidden))
        kv = {i: c.to(device) for i, c in self.kv.items()}
        moved = SessionState(live.mamba, kv, self.length, self.max_snapshots, live.last_hidden, self.hidden_size)
        moved._snapshots = OrderedDict((n, move(p)) for n, p in self._snapshots.items())
        return moved

    # ----------------------------------------------------------- fork, snapshot, rollback
    def fork(self) -> "SessionState":
        """An independent state with the same history. K/V rows are shared copy-on-write;
        snapshots are immutable, so both sides may keep referencing them."""
        child = SessionState(
            {i: m.clone() for i, m in self.mamba.items()},
            {i: c.fork() for i, c in self.kv.items()},
            self.length,
            self.max_snapshots,
            None if self.last_hidden is None else self.last_hidden.clone(),
            self.hidden_size,
        )
        child._snapshots = OrderedDict(self._snapshots)
        return child

    def snapshot(self) -> None:
        """Remember the Mamba states at the current length, so ``rollback`` can return here."""
        hidden = None if self.last_hidden is None else self.last_hidden.clone()
        self._snapshots[self.length] = _Point({i: m.clone() for i, m in self.mamba.items()}, hidden)
        self._snapshots.move_to_end(self.length)
        while len(self._snapshots) > self.max_snapshots:
            self._snapshots.popitem(last=False)

    def check_not_batched(self, action: str) -> None:
        if self.in_decode_batch:
            raise RuntimeError(f"this session is in an open DecodeBatch and cannot be {action} until it closes")

    @property
    def snapshot_lengths(self) -> list[int]:
        return sorted(self._snapshots)

    def can_rollback(self, length: int) -> bool:
        return length in (0, self.length) or length in self._snapshots

    def rollback(self, length: int) -> None:
        """Return to an earlier length: 0, or one that has a snapshot. Later snapshots are dropped."""
        self.check_not_batched("rolled back")
        if length == self.length:
            return
        if length > self.length:
            raise ValueError(f"cannot roll forward from {self.length} to {length} tokens")
        if length != 0 and length not in self._snapshots:
            raise KeyError(
                f"no snapshot at length {length}; rollback targets are 0 and {self.snapshot_lengths} "
                f"(the last {self.max_snapshots} snapshots are kept)"
            )
        if length == 0:  # the empty history: zero states, as at creation
            zeros = {i: MambaLayerState(m.conv.new_zeros(m.conv.shape), m.ssm.new_zeros(m.ssm.shape)) for i, m in self.mamba.items()}
            self.rewind(0, zeros, None)
        else:
            point = self._snapshots[length]
            hidden = None if point.last_hidden is None else point.last_hidden.clone()
            self.rewind(length, {i: m.clone() for i, m in point.mamba.items()}, hidden)

    def rewind(self, length: int, mamba: dict[int, MambaLayerState], last_hidden: torch.Tensor | None) -> None:
        """Truncate to ``length`` tokens and take ``mamba`` and ``last_hidden`` as the states
        there: the states must be those this history had at that length (from a snapshot,
        or a checkpoint log). Later snapshots are dropped."""
        self.check_not_batched("rolled back")
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind from {self.length} to {length} tokens")
        if mamba.keys() != self.mamba.keys():
            raise ValueError("rewind needs a Mamba state for exactly this state's Mamba layers")
        for cache in self.kv.values():
            cache.truncate(length)
        self.mamba = mamba
        self.last_hidden = last_hidden
        for n in [n for n in self._snapshots if n > length]:
            del self._snapshots[n]
        self.length = length


class DecodeBatch:
    """Sessions that decode together, one token each per forward.

    Each Mamba layer's states are stacked into one tensor with a slot (row) per session,
    and while the batch is open every session's ``MambaLayerState`` holds views of its
    slot: the in-place decode kernels update all sessions at once and nothing is
    scattered back. ``close()`` gives each session its own copy again. K/V caches stay
    per session, so attention reads each at its own length. Use it as a context manager;
    while it is open its sessions refuse appends, rollbacks and other batches (a fork is
    fine: it copies).
    """

    def __init__(self, states: Sequence[SessionState]):
        if not states:
            raise ValueError("a decode batch needs at least one session")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a session appears twice in the decode batch")
        for s in states:
            s.check_not_batched("added to another")
        self.states = list(states)
        self.mamba: dict[int, MambaLayerState] = {}
        for i in self.states[0].mamba:
            slots = MambaLayerState(
                torch.cat([s.mamba[i].conv for s in self.states]), torch.cat([s.mamba[i].ssm for s in self.states])
            )
            self.mamba[i] = slots
            for j, s in enumerate(self.states):
                s.mamba[i] = MambaLayerState(slots.conv[j : j + 1], slots.ssm[j : j + 1])
        self.kv: dict[int, BatchKV] = {i: BatchKV([s.kv[i] for s in self.states]) for i in self.states[0].kv}
        for s in self.states:
            s.in_decode_batch = True

    def __len__(self) -> int:
        return len(self.states)

    def advance(self, hidden: torch.Tensor) -> None:
        """Every session grew by one token; ``hidden [batch, hidden]`` are their last rows."""
        for j, s in enumerate(self.states):
            s.length += 1
            s.last_hidden = hidden[j : j + 1].clone()

    def close(self) -> None:
        for s in self.states:
            if s.in_decode_batch:
                s.mamba = {i: m.clone() for i, m in s.mamba.items()}
                s.in_decode_batch = False
        self.mamba = {}

    def __enter__(self) -> "DecodeBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BatchKV(list):
    """One attention layer's K/V caches in a ``DecodeBatch``, one per session, plus device
    tables of their buffers (addresses, head strides, lengths) for kernels that append to
    and read every cache in one launch. ``claim_one()`` grows every cache by a row and
    rebuilds the tables only when a buffer moved (rarely: growth past the headroom, or a
    fork's first write); otherwise the lengths advance on the device, with no host copy.
    """

    def __init__(self, caches: list[KVCache]):
        super().__init__(caches)
        self._tables: dict[str, torch.Tensor] | None = None

    def claim_one(self) -> dict[str, torch.Tensor]:
        """Claim a row in every cache; returns the tables, with lengths that include it."""
        moved = [c.claim(1) for c in self]
        if self._tables is None or any(moved):
            device = self[0].device
            buffers = [c.buffers for c in self]
            self._tables = {
                "k": torch.tensor([k.data_ptr() for k, _ in buffers], dtype=torch.int64, device=device),
                "v": torch.tensor([v.data_ptr() for _, v in buffers], dtype=torch.int64, device=device),
                "head_stride": torch.tensor([k.stride(1) for k, _ in buffers], dtype=torch.int64, device=device),
                "length": torch.tensor([c.length for c in self], dtype=torch.int32, device=device),
            }
        else:
            self._tables["length"] += 1
        return self._tables
