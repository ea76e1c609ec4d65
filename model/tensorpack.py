"""A small pickle-free container for named tensors: msgpack header plus raw bytes.

Layout::

    b"LLTP"  u16 version  u32 header_len  u32 header_crc32   header (msgpack)   payload

The header holds a ``kind`` string, free ``meta`` (msgpack scalars, lists, maps) and one
entry per tensor: name, dtype, shape, offset and length in the payload, and the CRC32 of
its bytes. Reading checks every one of these before a tensor is built, so a truncated,
corrupted or foreign blob raises ``CorruptBlobError`` and never yields wrong tensors.
Nothing is ever unpickled: a blob may come from an untrusted disk or peer.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import msgpack
import torch

MAGIC = b"LLTP"
VERSION = 1
_PREFIX = struct.Struct("<4sHII")  # magic, version, header length, header crc32
_MAX_HEADER = 64 * 1024 * 1024

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


def pack(kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> bytes:
    entries, chunks, offset = [], [], 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be packed")
        raw = _raw(t)
        entries.append(
            {
                "name": name,
                "dtype": _DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "offset": offset,
                "nbytes": raw.nbytes,
                "crc32": zlib.crc32(raw),
            }
        )
        chunks.append(raw)
        offset += raw.nbytes
    header = msgpack.packb({"kind": kind, "meta": meta or {}, "tensors": entries, "payload": offset})
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header), zlib.crc32(header))
    return b"".join([prefix, header, *chunks])


def _fail(msg: str) -> None:
    raise CorruptBlobError(msg)


def unpack(blob: bytes | bytearray | memoryview, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate and decode a pack of the expected ``kind``. Returns ``(tensors, meta)``."""
    view = memoryview(blob)
    if view.nbytes < _PREFIX.size:
        _fail(f"blob of {view.nbytes} bytes is too short to be a tensor pack")
    magic, version, header_len, header_crc = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        _fail("not a tensor pack (bad magic bytes)")
    if version != VERSION:
        _fail(f"tensor pack version {version} is not supported (this build reads version {VERSION})")
    if header_len > _MAX_HEADER or _PREFIX.size + header_len > view.nbytes:
        _fail("truncated tensor pack: header runs past the end of the blob")
    header_bytes = view[_PREFIX.size : _PREFIX.size + header_len]
    if zlib.crc32(header_bytes) != header_crc:
        _fail("tensor pack header checksum mismatch")
    try:
        header = msgpack.unpackb(header_bytes, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types; all mean a bad header
        raise CorruptBlobError(f"tensor pack header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        _fail("tensor pack header has the wrong structure")
    if header.get("kind") != kind:
        _fail(f"expected a {kind!r} blob, got {header.get('kind')!r}")
    payload = view[_PREFIX.size + header_len :]
    if header.get("payload") != payload.nbytes:
        _fail(f"truncated or padded tensor pack: payload is {payload.nbytes} bytes, header says {header.get('payload')}")

    tensors: dict[str, torch.Tensor] = {}
    for e in header["tensors"]:
        try:
            name, dtype, shape = e["name"], DTYPES[e["dtype"]], [int(s) for s in e["shape"]]
            offset, nbytes, crc = int(e["offset"]), int(e["nbytes"]), int(e["crc32"])
        except (KeyError, TypeError, ValueError):
            raise CorruptBlobError("tensor pack has a malformed tensor entry") from None
        if any(s < 0 for s in shape) or math.prod(shape) * dtype.itemsize != nbytes:
            _fail(f"tensor {name!r}: shape {shape} does not match its {nbytes} bytes")
        if offset < 0 or offset + nbytes > payload.nbytes:
            _fail(f"tensor {name!r} lies outside the payload")
        raw = payload[offset : offset + nbytes]
        if zlib.crc32(raw) != crc:
            _fail(f"tensor {name!r}: checksum mismatch (corrupted bytes)")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(shape)
    meta = header.get("meta")
    if not isinstance(meta, dict):
        _fail("tensor pack meta must be a map")
    return tensors, meta
