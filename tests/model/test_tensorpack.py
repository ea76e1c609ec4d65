"""The tensor pack: exact round trips, and hostile blobs refused without large allocations."""

import random
import struct
import tracemalloc
import zlib

import msgpack
import pytest
import torch

from model.tensorpack import (
    _PREFIX,
    DTYPES,
    MAGIC,
    MAX_ENTRIES,
    MAX_HEADER_BYTES,
    VERSION,
    CorruptBlobError,
    pack,
    unpack,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "kv.4.k": torch.randn(1, 2, 5, 8, generator=g),
        "kv.4.v": torch.randn(1, 2, 5, 8, generator=g),  # same shape as k: a swap must be caught
        "half": torch.randn(3, 4, generator=g).to(torch.float16),
        "brain": torch.randn(7, generator=g).to(torch.bfloat16),
        "double": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "ids": torch.randint(-(2**40), 2**40, (6,), generator=g),
        "i32": torch.randint(-(2**30), 2**30, (3, 1), generator=g, dtype=torch.int32),
        "bytes": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(2, 0, 3),
        "scalar": torch.tensor(3.5),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        "nothing": torch.zeros(0, dtype=torch.int32),  # an empty last entry: dropping it must be caught
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def frame(header: dict | bytes, payload: bytes = b"", version: int = VERSION) -> bytes:
    """A blob with a correct prefix and header checksum around any header: what an attacker can write."""
    raw = header if isinstance(header, bytes) else msgpack.packb(header)
    return _PREFIX.pack(MAGIC, version, len(raw), zlib.crc32(raw)) + raw + payload


def empty_maps_header(n: int) -> bytes:
    """A valid header whose meta holds ``n`` empty maps: one byte each, the costliest to decode.
    Written as bytes, so a 64 MiB one needs no Python list of 64 Mi items to make."""
    return b"\x83\xa4kind\xa4test\xa7tensors\x90\xa4meta\x81\xa4junk\xdd" + struct.pack(">I", n) + b"\x80" * n


def split(blob: bytes) -> tuple[dict, bytes]:
    header_len = _PREFIX.unpack_from(blob)[2]
    return msgpack.unpackb(blob[_PREFIX.size : _PREFIX.size + header_len]), blob[_PREFIX.size + header_len :]


def peak_allocation(fn) -> tuple[int, object]:
    """Peak bytes Python allocated while ``fn`` ran (tracemalloc), and what it returned or raised."""
    tracemalloc.start()
    try:
        try:
            result = fn()
        except CorruptBlobError as exc:
            result = exc
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------- round trips
def test_round_trip_is_exact_for_every_dtype_and_shape():
    tensors = sample_tensors()
    assert {t.dtype for t in tensors.values()} == set(DTYPES.values())
    meta = {"length": 5, "layout": {"kv": {"4": [1, 2, 8]}}, "name": "ü", "f": 0.25, "none": None}
    got, got_meta = unpack(pack("test", tensors, meta), "test")
    assert_same(got, tensors)
    assert got_meta == meta


def test_unpacked_tensors_own_their_memory():
    blob = bytearray(pack("test", {"x": torch.arange(4.0)}))
    x = unpack(blob, "test")[0]["x"]
    blob[-16:] = bytes(16)  # the caller's buffer can be reused
    x += 1  # and the tensor is writable
    assert torch.equal(x, torch.arange(1.0, 5.0))


def test_pack_refuses_what_unpack_would_refuse():
    with pytest.raises(TypeError, match="complex64"):
        pack("test", {"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match=f"limit of {MAX_ENTRIES}"):
        pack("test", {f"t{i}": torch.zeros(0) for i in range(MAX_ENTRIES + 1)})
    with pytest.raises(ValueError, match="put large arrays in tensors"):
        pack("test", {}, {"ids": list(range(MAX_HEADER_BYTES // 2))})


# ---------------------------------------------------------------------------- hostile blobs
def test_a_huge_header_is_refused_before_it_is_read():
    blob = frame(empty_maps_header(64 * 2**20))
    peak, result = peak_allocation(lambda: unpack(blob, "test"))
    assert isinstance(result, CorruptBlobError) and f"over the limit of {MAX_HEADER_BYTES}" in str(result)
    assert peak < 64 * 1024  # before: 4.1 GB and 14 s spent decoding it


def test_the_largest_allowed_header_costs_a_bounded_decode():
    """A header of empty maps at the cap is the costliest msgpack can be given: each byte becomes a dict."""
    fill = MAX_HEADER_BYTES - len(empty_maps_header(0))
    blob = frame(empty_maps_header(fill))
    assert _PREFIX.unpack_from(blob)[2] == MAX_HEADER_BYTES
    peak, (_, meta) = peak_allocation(lambda: unpack(blob, "test"))
    assert len(meta["junk"]) == fill
    assert peak < 100 * MAX_HEADER_BYTES


def test_entries_aliasing_one_payload_range_are_refused():
    data = torch.zeros(2**20).numpy().tobytes()  # 4 MiB
    entries = [{"name": f"t{i}", "dtype": "float32", "shape": [2**20], "crc32": zlib.crc32(data)} for i in range(200)]
    blob = frame({"kind": "test", "meta": {}, "tensors": entries}, data)
    peak, result = peak_allocation(lambda: unpack(blob, "test"))
    assert isinstance(result, CorruptBlobError) and "'t1' runs past the 4194304-byte payload" in str(result)
    assert peak < 256 * 1024  # before: 200 copies, +800 MB


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["tensors"].append(dict(h["tensors"][0])), "'kv.4.k' twice"),
        (lambda h: h["tensors"].__setitem__(slice(0, 2), h["tensors"][1::-1]), "'kv.4.v': checksum mismatch"),
        (lambda h: h["tensors"].append(h["tensors"].pop(9)), "'scalar': checksum"),  # "empty" moved to the end
        (lambda h: h["tensors"].pop(), "'kv.4.k': checksum"),  # the empty last one dropped: the count starts the chain
        (lambda h: h["tensors"][0].update(shape=[1, 2, 5, 4]), "padded tensor pack"),
        (lambda h: h["tensors"][0].update(shape=[2, 1, 5, 8]), "'kv.4.k': checksum"),
        (lambda h: h["tensors"][0].update(dtype="int32"), "'kv.4.k': checksum"),
        (lambda h: h["tensors"][9].update(shape=[2, 0, 5]), "'empty': checksum"),
        (lambda h: h["tensors"][9].update(shape=[2, 0, 2**64 - 1]), "bad shape"),
        (lambda h: h["tensors"][0].update(shape=[2**62, 2**62]), "runs past"),
        (lambda h: h["tensors"][0].update(shape=[-1, 2, 5, 8]), "bad shape"),
        (lambda h: h["tensors"][0].update(shape=[1] * 17), "bad shape"),
        (lambda h: h["tensors"][0].update(shape=[True, 2, 5, 8]), "bad shape"),
        (lambda h: h["tensors"][0].update(crc32=-1), "malformed"),
        (lambda h: h["tensors"][0].update(crc32=2**64 - 1), "malformed"),
        (lambda h: h["tensors"][0].update(dtype="complex64"), "malformed"),
        (lambda h: h["tensors"][0].update(dtype=["float32"]), "malformed"),
        (lambda h: h["tensors"][0].update(offset=0), "malformed"),
        (lambda h: h["tensors"][0].pop("crc32"), "malformed"),
        (lambda h: h["tensors"].extend([{"name": f"e{i}", "dtype": "uint8", "shape": [0], "crc32": 0} for i in range(MAX_ENTRIES)]), "over the limit of 4096"),
        (lambda h: h.update(tensors={"a": 1}), "wrong structure"),
        (lambda h: h.update(extra=1), "wrong structure"),
        (lambda h: h.update(meta=[1, 2]), "meta must be a map"),
        (lambda h: h.update(kind="longllava.other"), "expected a 'test' blob"),
    ],
)
def test_edited_headers_are_refused(edit, match):
    """Each edit keeps the header checksum right, so the check behind it must catch it."""
    header, payload = split(pack("test", sample_tensors(), {"length": 5}))
    assert header["tensors"][9]["name"] == "empty"
    edit(header)
    with pytest.raises(CorruptBlobError, match=match):
        unpack(frame(header, payload), "test")


def test_swapped_payloads_are_caught_by_the_name_bound_checksums():
    tensors = sample_tensors()
    header, payload = split(pack("test", tensors))
    n = tensors["kv.4.k"].numel() * 4  # kv.4.k and kv.4.v are the first two, of equal size
    swapped = payload[n : 2 * n] + payload[:n] + payload[2 * n :]
    with pytest.raises(CorruptBlobError, match="'kv.4.k': checksum mismatch"):
        unpack(frame(header, swapped), "test")


def test_bool_bytes_must_be_zero_or_one():
    """A writer with right checksums can still put a 2 in a bool tensor; torch assumes 0 or 1."""
    blob = pack("test", {"mask": torch.tensor([1, 0, 2], dtype=torch.uint8).view(torch.bool)})
    with pytest.raises(CorruptBlobError, match="bool bytes"):
        unpack(blob, "test")


def test_version_1_blobs_are_refused_by_name():
    data = torch.arange(3.0).numpy().tobytes()
    entry = {"name": "x", "dtype": "float32", "shape": [3], "offset": 0, "nbytes": 12, "crc32": zlib.crc32(data)}
    old = frame({"kind": "test", "meta": {}, "tensors": [entry], "payload": 12}, data, version=1)
    with pytest.raises(CorruptBlobError, match="version 1 is not supported .*version 2 only"):
        unpack(old, "test")


# ---------------------------------------------------------------------------- fuzz
def mutations(blob: bytes, header: dict, payload: bytes, rng: random.Random):
    """Hostile variants of a real blob, by kind: what a bad disk, a torn write or an attacker makes."""
    header_len = len(blob) - len(payload) - _PREFIX.size
    while True:
        kind = rng.randrange(6)
        if kind == 0:  # random bytes, sometimes behind a valid magic and version
            junk = rng.randbytes(rng.randrange(64))
            yield "random", (_PREFIX.pack(MAGIC, VERSION, rng.randrange(2**32), rng.randrange(2**32)) if rng.random() < 0.5 else b"") + junk
        elif kind == 1:  # bit flips anywhere
            flipped = bytearray(blob)
            for at in rng.sample(range(len(flipped)), rng.choice([1, 1, 2, 3, 8])):
                flipped[at] ^= 1 << rng.randrange(8)
            yield "bit flip", bytes(flipped)
        elif kind == 2:  # truncations (torn writes) and padding
            cut = rng.randrange(len(blob) + 1)
            yield "truncation", blob[:cut] if rng.random() < 0.8 else blob + rng.randbytes(rng.randrange(1, 32))
        elif kind == 3:  # prefix fields set to extremes
            fields = list(_PREFIX.unpack_from(blob))
            i = rng.randrange(1, 4)
            fields[i] = rng.choice([0, 1, 2**(16 if i == 1 else 32) - 1, fields[i] + 1, max(fields[i] - 1, 0), header_len * 4])
            yield "prefix field", _PREFIX.pack(*fields) + blob[_PREFIX.size :]
        elif kind == 4:  # header fields set to huge, negative or wrongly typed values, checksum kept right
            edited = msgpack.unpackb(msgpack.packb(header))
            entry = rng.choice(edited["tensors"])
            key = rng.choice(["name", "dtype", "shape", "crc32"])
            value = rng.choice([-1, 2**63, -(2**63), 2**64 - 1, "", "float32", None, [], [2**40] * 3, [-5], [0], 1.5, {"a": 1}])
            entry[key] = entry["shape"][:-1] + [value] if key == "shape" and rng.random() < 0.5 else value
            yield "header field", frame(edited, payload)
        else:  # entries reordered, dropped or duplicated, checksum kept right
            edited = msgpack.unpackb(msgpack.packb(header))
            entries = edited["tensors"]
            op = rng.randrange(3)
            if op == 0:
                rng.shuffle(entries)
            elif op == 1:
                entries.pop(rng.randrange(len(entries)))
            else:
                entries.insert(rng.randrange(len(entries)), dict(rng.choice(entries)))
            yield "entries", frame(edited, payload)


def test_fuzzed_blobs_raise_corrupt_blob_error_or_give_exactly_the_packed_tensors():
    tensors = sample_tensors()
    meta = {"length": 5, "layout": [1, 2, 3]}
    blob = pack("test", tensors, meta)
    header, payload = split(blob)
    rng = random.Random(1234)
    counts: dict[str, list[int]] = {}
    source = mutations(blob, header, payload, rng)
    for _ in range(10_000):
        kind, candidate = next(source)
        peak, result = peak_allocation(lambda: unpack(candidate, "test"))
        accepted = not isinstance(result, CorruptBlobError)
        if accepted:  # a mutation that changes nothing (e.g. a shuffle that kept the order) may pass
            assert_same(result[0], tensors)
            assert result[1] == meta
        assert peak <= 2 * len(candidate) + 64 * 1024, (kind, peak, len(candidate))
        counts.setdefault(kind, [0, 0])[accepted] += 1
    print({k: f"{refused} refused, {passed} accepted" for k, (refused, passed) in counts.items()})
    assert set(counts) == {"random", "bit flip", "truncation", "prefix field", "header field", "entries"}
    assert all(refused > 100 for refused, _ in counts.values())
    assert counts["bit flip"][1] == 0 and counts["random"][1] == 0  # CRC32 catches every flip of up to 3 bits here
