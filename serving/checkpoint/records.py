"""The bytes of a session log: framed, authenticated, chained items.

Three kinds of item, each a tensor pack (``model.tensorpack``) inside a frame:

- a **record**, one per state change a caller is told about (an append, the tokens a
  generation added, a rollback): the K/V rows it added, the Mamba states and hidden row at
  its end, its tokens and the step-table entries it changed;
- a **segment**, a snapshot's K/V rows, tokens and whole step table: records folded so
  the log stays short;
- a **point**, a snapshot's Mamba states and hidden row: a rollback target. It is a
  file of its own so a retention policy can drop old rollback targets without
  rewriting the K/V rows they share.

A frame is ``head | payload | tag``: the head holds a magic, a version and the payload's
length; the tag is HMAC-SHA256 of head and payload under the store's key, or SHA-256 when
there is no key. The tag is also the item's digest, and every item names the digest of
its predecessor (``prev``), its session, its sequence number and its branch, so a
reader refuses what was torn by a crash, edited, copied from another session, left on an
abandoned branch or put out of order. Nothing is unpickled; every field is validated
before any tensor is built, and nothing is allocated beyond the frame's own size.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import IO, Any, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.tensorpack import CorruptBlobError, pack, unpack

MAGIC = b"LLCK"
VERSION = 1
HEAD = struct.Struct("<4sH2xQ")  # magic, version, padding, payload length
TAG_BYTES = 32
GENESIS = bytes(TAG_BYTES)  # the predecessor of a session's first item
MAX_PAYLOAD = 1 << 40  # a sanity bound; the real bound is the file's own size

Kind = Literal["record", "segment", "point"]
PACK_KINDS = {"record": "longllava.ckpt.record", "segment": "longllava.ckpt.segment", "point": "longllava.ckpt.point"}

_Count = Field(ge=0, le=1 << 48)
_Digest = Field(min_length=TAG_BYTES, max_length=TAG_BYTES)


class _Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    session: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=1, le=1 << 48)
    generation: int = Field(ge=1, le=1 << 48)
    prev: bytes = _Digest
    model: str = Field(max_length=128)  # the model's fingerprint
    layout: dict[str, Any]  # model.state_codec.state_layout


class RecordMeta(_Meta):
    action: Literal["append", "generate", "rollback"]
    branch: bytes = _Digest  # the digest of the rollback (or fork, or genesis) this branch grew from
    base_length: int = _Count  # the history length the record starts from; shorter than the last one after a rollback
    length: int = _Count
    first_step: int = _Count  # the record's step-table entries replace those after this step
    step: int = _Count  # the session's last step after the record


class SegmentMeta(_Meta):
    branch: bytes = _Digest
    base_length: int = _Count
    length: int = _Count
    forked_from: str | None = Field(None, max_length=64)  # the session the segment before it belongs to, past a fork


class PointMeta(_Meta):
    segment: bytes = _Digest  # the segment whose end this point is
    length: int = _Count
    step: int = _Count


META_TYPES: dict[str, type[_Meta]] = {"record": RecordMeta, "segment": SegmentMeta, "point": PointMeta}


@dataclass(frozen=True)
class Item:
    """One verified item: its digest, validated meta and tensors."""

    kind: Kind
    digest: bytes
    meta: _Meta
    tensors: dict[str, torch.Tensor]
    nbytes: int  # the frame's size on disk


def _tag(key: bytes | None, *parts: bytes | memoryview) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def encode(kind: Kind, meta: _Meta, tensors: dict[str, torch.Tensor], key: bytes | None) -> tuple[bytes, bytes]:
    """The frame's bytes and its digest."""
    payload = pack(PACK_KINDS[kind], tensors, meta.model_dump())
    head = HEAD.pack(MAGIC, VERSION, len(payload))
    tag = _tag(key, head, payload)
    return b"".join((head, payload, tag)), tag


class TornFrame(Exception):
    """The bytes end inside a frame: what a crash during a write leaves behind."""


def _decode(kind: Kind, head: bytes, payload: bytes, tag: bytes, key: bytes | None) -> Item:
    if not hmac.compare_digest(_tag(key, head, payload), tag):
        raise CorruptBlobError("checkpoint item failed its authentication check (edited, corrupted, or another key)")
    tensors, raw_meta = unpack(payload, PACK_KINDS[kind])
    try:
        meta = META_TYPES[kind].model_validate(raw_meta)
    except ValidationError as exc:
        raise CorruptBlobError(f"checkpoint {kind} has invalid fields: {exc.errors()[0]['msg']}") from None
    return Item(kind, tag, meta, tensors, HEAD.size + len(payload) + TAG_BYTES)


def read_frames(f: IO[bytes], size: int, kind: Kind, key: bytes | None) -> Iterator[Item]:
    """The items of a file of ``size`` bytes, in order. Stops with ``TornFrame`` at a
    frame the file ends inside, and with ``CorruptBlobError`` at one that is damaged."""
    offset = 0
    while offset < size:
        if size - offset < HEAD.size:
            raise TornFrame(f"{size - offset} stray bytes at the end")
        head = f.read(HEAD.size)
        magic, version, length = HEAD.unpack(head)
        if magic != MAGIC:
            raise CorruptBlobError(f"no checkpoint frame at byte {offset} (bad magic)")
        if version != VERSION:
            raise CorruptBlobError(f"checkpoint frame version {version} is not supported (this build reads {VERSION})")
        if length > MAX_PAYLOAD or HEAD.size + length + TAG_BYTES > size - offset:
            raise TornFrame(f"a frame of {length} bytes runs past the end of the file")
        payload = f.read(length)
        tag = f.read(TAG_BYTES)
        yield _decode(kind, head, payload, tag, key)
        offset += HEAD.size + length + TAG_BYTES


def model_fingerprint(model: torch.nn.Module, config_json: str) -> str:
    """A short name for a model's config and weights, recorded in every item so that a
    session is never restored into another model. It reads a few values of every
    parameter (not all of them), so it costs microseconds even for a 53B model."""
    h = hashlib.sha256(config_json.encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:4], flat[-4:]]).to("cpu", torch.float64) if flat.numel() else flat.cpu()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]
