"""A small pickle-free container for named tensors: msgpack header plus raw bytes.

Layout (version 2)::

    b"LLTP"  u16 version  u32 header_len  u32 header_crc32   header (msgpack)   payload

The header holds a ``kind`` string, free ``meta`` (msgpack scalars, lists, maps) and one
entry per tensor: name, dtype, shape and CRC32. The payload is the tensors' bytes back to
back in entry order, so the entries tile it exactly: no offsets are stored, and no two
entries can share, overlap or skip bytes. The CRCs are chained: an entry's CRC32 runs over
``name (UTF-8) 0x00 dtype 0x00 dims (u64 little-endian each)`` and then its tensor's bytes,
starting from the previous entry's CRC (the first from the CRC32 of the entry count as a
u32). So bytes or entries swapped, moved, edited, dropped or duplicated fail a check, even
an empty tensor's, which has no bytes of its own.

Reading checks everything before a tensor is built, so a truncated, corrupted or foreign
blob raises ``CorruptBlobError`` and never yields wrong tensors. The header and the number
of entries are capped, and entry sizes must add up to the bytes present before any are
copied, so ``unpack`` allocates the tensors it returns (one copy of the payload) plus the
decoded header, which the cap bounds: about 19 MiB at worst, for a header of nothing but
empty maps, and a few KiB for a real one. Nothing is ever unpickled: a blob may come from
an untrusted disk or peer.

Version 1 (offsets in the header, CRC of the data alone) is refused with an error naming
it; its blobs were only ever in-memory session deltas.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any, NoReturn

import msgpack
import numpy as np
import torch

MAGIC = b"LLTP"
VERSION = 2
_PREFIX = struct.Struct("<4sHII")  # magic, version, header length, header crc32

# A 32-layer LongLLaVA state has about 70 entries and a header of a few KiB; the caps bound
# what a hostile header can make msgpack build (each header byte can become a Python object).
MAX_HEADER_BYTES = 256 << 10
MAX_ENTRIES = 4096
MAX_NDIM = 16
_HEADER_KEYS = {"kind", "meta", "tensors"}
_ENTRY_KEYS = {"name", "dtype", "shape", "crc32"}

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CorruptBlobError(ValueError):
    """The bytes are not a valid tensor pack (truncated, corrupted, wrong version or kind)."""


def _raw(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _first_crc(count: int) -> int:
    return zlib.crc32(struct.pack("<I", count))


def _entry_crc(name: str, dtype: str, shape: list[int], raw: memoryview, previous: int) -> int:
    fields = b"\0".join([name.encode("utf-8"), dtype.encode("ascii"), struct.pack(f"<{len(shape)}Q", *shape)])
    return zlib.crc32(raw, zlib.crc32(fields, previous))


def pack(kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> bytes:
    """The blob for ``tensors`` (in their order) and ``meta``; refuses what ``unpack`` would refuse."""
    if len(tensors) > MAX_ENTRIES:
        raise ValueError(f"{len(tensors)} tensors is over the limit of {MAX_ENTRIES} per pack")
    entries, chunks, crc = [], [], _first_crc(len(tensors))
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be packed")
        if t.dim() > MAX_NDIM:
            raise ValueError(f"tensor {name!r}: {t.dim()} dimensions is over the limit of {MAX_NDIM}")
        raw, dtype, shape = _raw(t), _DTYPE_NAMES[t.dtype], list(t.shape)
        crc = _entry_crc(name, dtype, shape, raw, crc)
        entries.append({"name": name, "dtype": dtype, "shape": shape, "crc32": crc})
        chunks.append(raw)
    header = msgpack.packb({"kind": kind, "meta": meta or {}, "tensors": entries})
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"the header is {len(header)} bytes, over the limit of {MAX_HEADER_BYTES}; put large arrays in tensors")
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header), zlib.crc32(header))
    return b"".join([prefix, header, *chunks])


def _fail(msg: str) -> NoReturn:
    raise CorruptBlobError(msg)


def unpack(blob: bytes | bytearray | memoryview, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate and decode a pack of the expected ``kind``. Returns ``(tensors, meta)``."""
    view = memoryview(blob).cast("B")
    header, payload = _split(view)
    if header["kind"] != kind:
        _fail(f"expected a {kind!r} blob, got {str(header['kind'])[:64]!r}")
    meta = header["meta"]
    if not isinstance(meta, dict):
        _fail("tensor pack meta must be a map")
    entries = _entries(header["tensors"], payload.nbytes)
    tensors, offset, crc = {}, 0, _first_crc(len(entries))
    for name, dtype, shape, nbytes, expected_crc in entries:
        raw = payload[offset : offset + nbytes]
        offset += nbytes
        crc = _entry_crc(name, dtype, shape, raw, crc)
        if crc != expected_crc:
            _fail(f"tensor {name!r}: checksum mismatch (corrupted bytes, or entries edited, moved or dropped)")
        tensors[name] = _tensor(name, raw, dtype, shape)
    return tensors, meta


def _split(view: memoryview) -> tuple[dict, memoryview]:
    """The checked prefix, the decoded header, and the payload that follows it."""
    if view.nbytes < _PREFIX.size:
        _fail(f"blob of {view.nbytes} bytes is too short to be a tensor pack")
    magic, version, header_len, header_crc = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        _fail("not a tensor pack (bad magic bytes)")
    if version != VERSION:
        _fail(f"tensor pack version {version} is not supported (this build reads version {VERSION} only)")
    if header_len > MAX_HEADER_BYTES:
        _fail(f"tensor pack header of {header_len} bytes is over the limit of {MAX_HEADER_BYTES}")
    if _PREFIX.size + header_len > view.nbytes:
        _fail("truncated tensor pack: header runs past the end of the blob")
    header_bytes = view[_PREFIX.size : _PREFIX.size + header_len]
    if zlib.crc32(header_bytes) != header_crc:
        _fail("tensor pack header checksum mismatch")
    try:
        header = msgpack.unpackb(header_bytes, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types; all mean a bad header
        raise CorruptBlobError(f"tensor pack header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        _fail("tensor pack header has the wrong structure")
    return header, view[_PREFIX.size + header_len :]


def _entries(raw_entries: Any, payload_bytes: int) -> list[tuple[str, str, list[int], int, int]]:
    """``(name, dtype name, shape, nbytes, crc)`` per entry, checked to tile exactly ``payload_bytes``."""
    if not isinstance(raw_entries, list):
        _fail("tensor pack header has the wrong structure")
    if len(raw_entries) > MAX_ENTRIES:
        _fail(f"tensor pack lists {len(raw_entries)} tensors, over the limit of {MAX_ENTRIES}")
    entries, names, total = [], set(), 0
    for e in raw_entries:
        if not isinstance(e, dict) or set(e) != _ENTRY_KEYS:
            _fail("tensor pack has a malformed tensor entry")
        name, dtype, shape, crc = e["name"], e["dtype"], e["shape"], e["crc32"]
        typed = isinstance(name, str) and isinstance(shape, list) and type(crc) is int and 0 <= crc < 1 << 32
        if not typed or not isinstance(dtype, str) or dtype not in DTYPES:
            _fail(f"tensor pack has a malformed tensor entry {str(name)[:64]!r}")
        if name in names:
            _fail(f"tensor pack lists tensor {name!r} twice")
        if len(shape) > MAX_NDIM or not all(type(s) is int and 0 <= s < 1 << 63 for s in shape):
            _fail(f"tensor {name!r}: bad shape {shape[:MAX_NDIM + 1]}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        total += nbytes
        if total > payload_bytes:  # checked as we go, so absurd shapes stop here
            _fail(f"truncated tensor pack: tensor {name!r} runs past the {payload_bytes}-byte payload")
        names.add(name)
        entries.append((name, dtype, shape, nbytes, crc))
    if total != payload_bytes:
        _fail(f"padded tensor pack: the tensors hold {total} bytes but the payload is {payload_bytes}")
    return entries


def _tensor(name: str, raw: memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    """A tensor that owns a copy of ``raw``; bool bytes must be 0 or 1, as torch assumes."""
    if dtype == "bool" and np.frombuffer(raw, dtype=np.uint8).max(initial=0) > 1:
        _fail(f"tensor {name!r}: bool bytes other than 0 and 1")
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw.nbytes else torch.empty(0, dtype=torch.uint8)
    return flat.view(DTYPES[dtype]).reshape(shape)
