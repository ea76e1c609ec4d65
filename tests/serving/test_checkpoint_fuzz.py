"""Decoder fuzz: 10,000+ damaged checkpoint frames, each refused cleanly or read back exactly.

The corpus is real: every frame (records, segments, points) that a real Engine wrote to a
real store, with and without a key, over appends with images, replies, a rollback and a
fork, on a tiny LongLLaVA so the loop stays fast. The damage is seeded: random bytes, bit
flips, truncations, frame heads with huge lengths, splices of frames, and payloads whose
fields are set to huge, negative or wrong values and then re-framed with a valid tag (so
the checks behind the tag are exercised, not only the tag).

For every input: either ``read_frames`` raises ``CorruptBlobError`` or ``TornFrame`` (a
clean error), or each item it yields is one that was written, bit for bit. Re-tagged
payloads are new frames by construction, so for them an accepted item must be internally
whole (every tensor the size its bytes say). And no input allocates more than a small
multiple of its own size, plus a constant.
"""

import io
import random
import tracemalloc
import zlib
from collections import Counter

import msgpack
import numpy as np
import pytest
import torch

from model.config import LongLLaVAConfig, VisionConfig
from model.longllava import LongLLaVA
from model.prompt import Image, Text, user_message
from model.tensorpack import CorruptBlobError
from serving.checkpoint import CheckpointPolicy, DirectoryStore
from serving.checkpoint.records import HEAD, MAGIC, TAG_BYTES, TornFrame, _tag, read_frames
from serving.engine import Engine
from serving.types import SamplingParams

TINY = LongLLaVAConfig(
    vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, num_experts=1, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
    mamba_d_state=4, mamba_dt_rank=4, mm_hidden_size=16, image_tokens=36, builtin_tokenizer="byte",
    vision_config=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=84, projection_dim=16),
)
PER_KIND = 1700  # six kinds of damage: 10,200 inputs
KEY = b"fuzz key"


def write_corpus(path, key):
    """Every frame a real session log holds after some steps, a rollback and a fork."""
    torch.manual_seed(0)
    engine = Engine(LongLLaVA(TINY), device="cpu", store=DirectoryStore(path, key=key),
                    checkpoint=CheckpointPolicy(snapshot_every=3), rollback_window=2)
    s = engine.create()
    greedy = SamplingParams(max_new_tokens=3, ignore_eos=True)
    for n in range(1, 6):
        image = np.random.default_rng(n).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        engine.append(s, user_message([Image(image), Text(f"step {n}")]), step=n)
        engine.generate_text(s, greedy, step=n)
    engine.rollback(s, 2)
    child = engine.fork(s)
    engine.append(child, [Text("on the fork")])
    engine.shutdown()
    frames = []
    store = engine.store
    for session in store.sessions():
        for name, size in store.files(session).items():
            kind = "record" if name.startswith("log-") else name.rsplit(".", 1)[-1]
            if kind not in ("record", "segment", "point"):
                continue
            data = store.fs.cat_file(store.path(session, name))
            offset = 0
            for item in read_frames(io.BytesIO(data), size, kind, key):
                frames.append((kind, data[offset : offset + item.nbytes], item, key))
                offset += item.nbytes
    return frames


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    frames = write_corpus(tmp_path_factory.mktemp("plain"), None) + write_corpus(tmp_path_factory.mktemp("keyed"), KEY)
    assert {k for k, _, _, _ in frames} == {"record", "segment", "point"}
    return frames


# ------------------------------------------------------------------------------ damage
def random_bytes(rng, frame, frames):
    return rng.randbytes(rng.randint(0, 2 * len(frame)))


def bit_flips(rng, frame, frames):
    out = bytearray(frame)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncation(rng, frame, frames):
    return frame[: rng.randrange(len(frame))]


def head_fields(rng, frame, frames):
    magic, version, length = HEAD.unpack_from(frame)
    choice = rng.randrange(4)
    if choice == 0:
        length = rng.choice([0, 1, 2**63, 2**64 - 1, 2**40, length + rng.randint(1, 64), max(0, length - rng.randint(1, 64))])
    elif choice == 1:
        version = rng.randrange(2**16)
    elif choice == 2:
        magic = rng.randbytes(4)
    else:
        return HEAD.pack(magic, version, length) + frame[HEAD.size :] + frame[HEAD.size :]  # the payload twice
    return HEAD.pack(magic, version, length) + frame[HEAD.size :]


def splice(rng, frame, frames):
    other = rng.choice(frames)[1]
    cut = rng.randrange(len(frame))
    return rng.choice([frame + other, frame[:cut] + other[cut:], frame + frame, other[: HEAD.size] + frame[HEAD.size :]])


HOSTILE = [-1, -(2**63), 2**63, 2**64 - 1, 2**48 + 1, 0, "x" * 200, b"\x00" * 31, None, [], {}, 1.5]


def retagged_fields(rng, frame, frames, key):
    """A payload field set to a hostile value, then framed again with a valid tag."""
    head, payload = frame[: HEAD.size], frame[HEAD.size : -TAG_BYTES]
    prefix_len = 14
    header_len = int.from_bytes(payload[6:10], "little")
    header = msgpack.unpackb(payload[prefix_len : prefix_len + header_len], raw=False)
    target = header["meta"] if rng.random() < 0.6 else rng.choice(header["tensors"])
    field = rng.choice(sorted(target))
    if field == "shape" and rng.random() < 0.5:
        target[field] = [rng.choice([-1, 2**40, 0, 7]) for _ in range(rng.randint(0, 20))]
    else:
        target[field] = rng.choice(HOSTILE)
    new_header = msgpack.packb(header, use_bin_type=True)
    prefix = payload[:6] + len(new_header).to_bytes(4, "little") + zlib.crc32(new_header).to_bytes(4, "little")
    new_payload = prefix + new_header + payload[prefix_len + header_len :]
    new_head = HEAD.pack(MAGIC, HEAD.unpack_from(head)[1], len(new_payload))
    return new_head + new_payload + _tag(key, new_head, new_payload)


DAMAGE = [random_bytes, bit_flips, truncation, head_fields, splice, retagged_fields]


def same_item(a, b) -> bool:
    return a.digest == b.digest and a.meta == b.meta and a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


def test_damaged_frames_are_refused_or_read_back_exactly(corpus):
    rng = random.Random(1234)
    written = {item.digest: item for _, _, item, _ in corpus}
    outcomes: Counter = Counter()
    tracemalloc.start()
    try:
        for damage in DAMAGE:
            for _ in range(PER_KIND):
                kind, frame, _, key = rng.choice(corpus)
                blob = damage(rng, frame, corpus, key) if damage is retagged_fields else damage(rng, frame, corpus)
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                try:
                    items = list(read_frames(io.BytesIO(blob), len(blob), kind, key))
                except (CorruptBlobError, TornFrame) as exc:
                    outcomes[damage.__name__, "refused", type(exc).__name__] += 1
                    items = None
                peak = tracemalloc.get_traced_memory()[1] - base
                assert peak <= 4 * len(blob) + 4 * 2**20, f"{damage.__name__}: {peak} bytes for a {len(blob)}-byte input"
                if items is None:
                    continue
                outcomes[damage.__name__, "accepted"] += 1
                for item in items:
                    if damage is retagged_fields and item.digest not in written:
                        assert all(t.numel() * t.element_size() == t.untyped_storage().nbytes() or t.numel() == 0
                                   for t in item.tensors.values())
                        continue
                    assert item.digest in written and same_item(item, written[item.digest]), damage.__name__
    finally:
        tracemalloc.stop()
    total = sum(outcomes.values())
    refused = sum(v for k, v in outcomes.items() if k[1] == "refused")
    print(f"\n{total} inputs: {refused} refused cleanly, {total - refused} accepted")
    for k, v in sorted(outcomes.items()):
        print("  ", " ".join(k), v)
    assert total >= 10_000
    for damage in DAMAGE:  # every kind of damage was mostly refused
        assert outcomes[damage.__name__, "accepted"] < PER_KIND / 2, damage.__name__
