"""Session state operations: append, fork, rollback, serialisation and deltas."""

import ast
import pathlib
import struct

import pytest
import torch

from model.state_codec import CorruptBlobError, StateMismatchError, apply_state_delta, state_from_bytes, state_to_bytes
from model.tensorpack import _PREFIX


@pytest.fixture
def lm(make_pair):
    return make_pair(layers=9, experts=4)[1]


def run(lm, state, ids):
    with torch.no_grad():
        return lm.prefill(state, lm.embed_tokens(ids), logits="all")


def ids_(n, seed=0):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


def assert_same_state(a, b):
    assert a.length == b.length
    for i in a.kv:
        assert torch.equal(a.kv[i].k, b.kv[i].k) and torch.equal(a.kv[i].v, b.kv[i].v)
    for i in a.mamba:
        assert torch.equal(a.mamba[i].conv, b.mamba[i].conv) and torch.equal(a.mamba[i].ssm, b.mamba[i].ssm)


def test_chunked_append_equals_full_recompute(lm):
    ids = ids_(60)
    full_state = lm.new_state()
    full = run(lm, full_state, ids)
    state = lm.new_state()
    parts = [run(lm, state, ids[s:e]) for s, e in [(0, 13), (13, 14), (14, 40), (40, 60)]]
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=1e-4)
    for i in state.mamba:
        torch.testing.assert_close(state.mamba[i].ssm, full_state.mamba[i].ssm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.kv[4].k, full_state.kv[4].k, rtol=1e-4, atol=1e-5)


def test_fork_diverges_without_touching_parent(lm):
    parent = lm.new_state()
    run(lm, parent, ids_(20))
    before = state_to_bytes(parent)
    child = parent.fork()
    run(lm, child, ids_(15, seed=1))
    assert child.length == 35 and parent.length == 20
    assert state_to_bytes(parent) == before
    # the parent appends too; the child's rows must survive the shared buffer
    child_bytes = state_to_bytes(child)
    out_parent = run(lm, parent, ids_(15, seed=2))
    assert state_to_bytes(child) == child_bytes
    # and the parent's continuation equals a fresh run of the same tokens
    fresh = lm.new_state()
    expected = run(lm, fresh, torch.cat([ids_(20), ids_(15, seed=2)]))[20:]
    torch.testing.assert_close(out_parent, expected, rtol=0, atol=1e-4)


def test_kv_rows_are_shared_until_written(lm):
    parent = lm.new_state()
    run(lm, parent, ids_(10))
    child = parent.fork()
    assert child.kv[4]._buf is parent.kv[4]._buf  # copy-on-write: no copy at fork
    run(lm, child, ids_(3))  # the child is at the frontier: writes in place
    run(lm, parent, ids_(3))  # the parent is not: it copies first
    assert child.kv[4]._buf is not parent.kv[4]._buf


def test_rollback_then_reappend_equals_original(lm):
    state = lm.new_state()
    run(lm, state, ids_(25))
    state.snapshot()
    original_out = run(lm, state, ids_(12, seed=5))
    original = state_to_bytes(state)
    run(lm, state, ids_(30, seed=6))
    state.snapshot()
    state.rollback(25)
    assert state.length == 25 and state.snapshot_lengths == [25]
    again = run(lm, state, ids_(12, seed=5))
    assert torch.equal(again, original_out)
    assert state_to_bytes(state) == original


def test_rollback_to_zero_and_to_unknown_length(lm):
    state = lm.new_state()
    first = run(lm, state, ids_(8))
    with pytest.raises(KeyError, match="no snapshot at length 5"):
        state.rollback(5)
    with pytest.raises(ValueError, match="roll forward"):
        state.rollback(9)
    state.rollback(0)
    assert torch.equal(run(lm, state, ids_(8)), first)


def test_snapshot_ring_is_bounded(lm):
    state = lm.new_state(max_snapshots=3)
    for n in range(5):
        run(lm, state, ids_(2, seed=n))
        state.snapshot()
    assert state.snapshot_lengths == [6, 8, 10]
    assert state.snapshot_nbytes == 3 * sum(m.nbytes for m in state.mamba.values())


def test_serialise_round_trips_bit_exactly(lm):
    state = lm.new_state()
    run(lm, state, ids_(33))
    blob = state_to_bytes(state)
    back = state_from_bytes(blob, lm.config)
    assert_same_state(state, back)
    assert state_to_bytes(back) == blob
    # the restored state continues exactly like the original
    assert torch.equal(run(lm, back, ids_(5, seed=9)), run(lm, state, ids_(5, seed=9)))


def test_deltas_reassemble_the_whole_state(lm):
    state = lm.new_state()
    rebuilt = lm.new_state()
    for n, seed in [(9, 1), (1, 2), (17, 3)]:
        before = state.length
        run(lm, state, ids_(n, seed))
        apply_state_delta(rebuilt, state_to_bytes(state, since=before))
    assert_same_state(state, rebuilt)
    assert state_to_bytes(rebuilt) == state_to_bytes(state)
    # a delta holds only the new K/V rows (plus the Mamba states, as the whole state does)
    row_bytes = sum(2 * c.k[:, :, :1].nbytes for c in state.kv.values())
    saved = len(state_to_bytes(state)) - len(state_to_bytes(state, since=state.length - 1))
    assert saved >= (state.length - 1) * row_bytes


def test_nbytes_counts_live_rows(lm):
    state = lm.new_state()
    run(lm, state, ids_(10))
    kv = 2 * 10 * lm.config.num_key_value_heads * lm.config.head_dim * 4
    mamba = len(lm.config.mamba_layers) * lm.config.d_inner * (lm.config.mamba_d_conv + lm.config.mamba_d_state) * 4
    hidden = lm.config.hidden_size * 4
    assert state.nbytes == kv * len(lm.config.attention_layers) + mamba + hidden


def test_corrupted_truncated_and_wrong_blobs_are_rejected(lm, make_pair):
    state = lm.new_state()
    run(lm, state, ids_(12))
    blob = state_to_bytes(state)
    target = lm.new_state()

    flipped = bytearray(blob)
    flipped[-5] ^= 0x40
    with pytest.raises(CorruptBlobError, match="checksum"):
        apply_state_delta(target, bytes(flipped))
    with pytest.raises(CorruptBlobError, match="truncated"):
        apply_state_delta(target, blob[:-100])
    with pytest.raises(CorruptBlobError, match="too short"):
        apply_state_delta(target, blob[:5])
    with pytest.raises(CorruptBlobError, match="magic"):
        apply_state_delta(target, b"PK\x03\x04" + blob[4:])
    magic, _, hlen, hcrc = _PREFIX.unpack_from(blob)
    with pytest.raises(CorruptBlobError, match="version 7"):
        apply_state_delta(target, _PREFIX.pack(magic, 7, hlen, hcrc) + blob[_PREFIX.size :])
    header = bytearray(blob)
    header[_PREFIX.size + 3] ^= 0x01
    with pytest.raises(CorruptBlobError, match="header checksum"):
        apply_state_delta(target, bytes(header))
    # nothing of the above changed the target
    assert target.length == 0 and target.kv[4].length == 0

    other = make_pair(layers=9, experts=4, mamba_d_state=4)[1]
    with pytest.raises(StateMismatchError, match="layout"):
        apply_state_delta(other.new_state(), blob)
    run(lm, target, ids_(5))
    with pytest.raises(StateMismatchError, match="delta starts at length 7 but the state has 5"):
        apply_state_delta(target, state_to_bytes(state, since=7))


def test_state_code_uses_no_pickle():
    root = pathlib.Path(__file__).parents[2] / "model"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "pickle" not in names | mods and "torch.load" not in path.read_text(), path


def test_moving_a_state_copies_it_whole(lm):
    state = lm.new_state()
    run(lm, state, ids_(9))
    state.snapshot()
    run(lm, state, ids_(4, seed=1))
    moved = state.to("cpu")
    assert_same_state(state, moved)
    assert moved.snapshot_lengths == state.snapshot_lengths
    run(lm, moved, ids_(3, seed=2))  # the copy grows alone
    assert state.length == 13 and moved.length == 16
    moved.rollback(9)
    assert moved.length == 9


def test_prefill_rejects_wrong_shapes(lm):
    state = lm.new_state()
    with pytest.raises(ValueError, match="at least one token"):
        lm.prefill(state, torch.zeros(0, lm.config.hidden_size))
    with pytest.raises(ValueError, match=r"shape \[L, 64\]"):
        lm.prefill(state, torch.zeros(3, 65))
    assert state.length == 0
