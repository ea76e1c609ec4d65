"""Durable sessions: the checkpoint log under the Engine, on real directories.

Every check compares against the live session: a session restored in a new engine, or
rolled back from the log, or forked and restored alone, must hold exactly the bytes the
live one held at that step (``state_to_bytes``: K/V rows, Mamba states, hidden row), and
generate the same tokens.
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import episode_worker as worker
from model.default import default_model
from model.state_codec import state_to_bytes
from serving.checkpoint import CheckpointPolicy, DirectoryStore
from serving.engine import Engine
from serving.errors import (
    SessionLogError,
    StepConflictError,
    StepGapError,
    StoreUnavailableError,
    UnknownSessionError,
)
from serving.types import SamplingParams

GREEDY = SamplingParams(max_new_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return default_model()


def engine_on(model, path, **kw) -> Engine:
    kw.setdefault("checkpoint", CheckpointPolicy(snapshot_every=3))
    return Engine(model, device="cpu", checkpoint_dir=path, **kw)


def state_bytes(engine: Engine, session: str) -> bytes:
    return state_to_bytes(engine.state_of(session))


def digest(engine: Engine, session: str) -> str:
    return hashlib.sha256(state_bytes(engine, session)).hexdigest()


def run_steps(engine: Engine, session: str, steps: range) -> dict[int, str]:
    """Append and reply for each step; the state's digest at the end of each."""
    seen = {}
    for n in steps:
        engine.append(session, worker.observation(n), step=n)
        engine.generate_text(session, GREEDY, step=n)
        seen[n] = digest(engine, session)
    return seen


@pytest.fixture(scope="module")
def uninterrupted(model):
    """A session with no store, for what the others should continue with."""
    engine = Engine(model, device="cpu")
    session = engine.create()
    seen = run_steps(engine, session, range(1, 8))
    return engine, session, seen


def continuation(engine: Engine, session: str) -> str:
    """The next reply, generated on a throwaway fork."""
    child = engine.fork(session)
    try:
        return engine.generate_text(child, GREEDY)[0]
    finally:
        engine.close(child)


def session_dir(engine: Engine, session: str):
    return engine.store.fs._strip_protocol(f"{engine.store.root}/sessions/{session}")


def test_a_new_engine_restores_the_session_exactly(model, tmp_path, uninterrupted):
    live = engine_on(model, tmp_path)
    s = live.create()
    run_steps(live, s, range(1, 8))
    live.flush()
    other = engine_on(model, tmp_path)
    info = other.session_info(s)
    assert (info.step, info.length, info.resident, info.durable_step) == (7, live.state_of(s).length, False, 7)
    assert state_bytes(other, s) == state_bytes(live, s)
    assert other.sessions.get(s).tokens == live.sessions.get(s).tokens
    reference, r, seen = uninterrupted
    assert digest(other, s) == seen[7]
    assert continuation(other, s) == continuation(reference, r)


def test_step_numbers_are_exact_across_a_restore(model, tmp_path):
    live = engine_on(model, tmp_path)
    s = live.create()
    run_steps(live, s, range(1, 4))
    replies = {n: live.generate_text(s, GREEDY, step=n) for n in (1, 2, 3)}  # re-sent: replayed
    live.flush()
    other = engine_on(model, tmp_path)
    before = other.session_info(s)
    for n in (1, 2, 3):  # older and latest steps re-sent with the same content are acknowledged
        ack = other.append(s, worker.observation(n), step=n)
        assert (ack.step, ack.tokens) == (n, 0)
        assert other.generate_text(s, GREEDY, step=n) == replies[n]
    assert other.session_info(s).length == before.length
    with pytest.raises(StepConflictError, match="step 2 was already applied with other content"):
        other.append(s, worker.observation(99), step=2)
    with pytest.raises(StepGapError, match="send step 4") as gap:
        other.append(s, worker.observation(5), step=5)
    assert gap.value.next_step == 4
    with pytest.raises(StepGapError, match="append step 4 first"):
        list(other.generate(s, GREEDY, step=4))
    assert other.session_info(s).length == before.length  # refusals change nothing


def test_torn_tail_is_dropped_and_restores_the_last_whole_step(model, tmp_path):
    live = engine_on(model, tmp_path, checkpoint=CheckpointPolicy(snapshot_every=100, sync=True))  # a record per change
    s = live.create()
    seen = run_steps(live, s, range(1, 5))
    live.flush()
    log_file = next(p for p in os.scandir(session_dir(live, s)) if p.name.startswith("log-"))
    with open(log_file.path, "r+b") as f:  # what a crash in the middle of the last write leaves
        f.truncate(os.path.getsize(log_file.path) - 100)
    other = engine_on(model, tmp_path)
    info = other.session_info(s)
    assert info.step == 4 and info.durable_step == 3  # step 4's reply was the torn record
    other.generate_text(s, GREEDY, step=4)  # the client re-sends it: generated again, alike
    assert digest(other, s) == seen[4]


def test_damaged_records_restore_to_the_last_intact_state(model, tmp_path):
    live = engine_on(model, tmp_path, checkpoint=CheckpointPolicy(snapshot_every=100, sync=True))  # a record per change
    s, bystander = live.create(), live.create()
    seen = run_steps(live, s, range(1, 5))
    run_steps(live, bystander, range(1, 3))
    bystander_bytes = state_bytes(live, bystander)
    live.flush()
    path = next(p.path for p in os.scandir(session_dir(live, s)) if p.name.startswith("log-"))
    frames = _frame_offsets(path)
    data = bytearray(open(path, "rb").read())
    data[frames[5] + 200] ^= 0x10  # a bit flip inside the 6th record: step 3's reply
    open(path, "wb").write(data)
    other = engine_on(model, tmp_path)
    info = other.session_info(s)
    assert info.step == 3 and digest(other, s) != seen[3]  # step 3's observation, without its reply
    assert other.generate_text(s, GREEDY, step=3)  # generated again, from the intact state
    assert digest(other, s) == seen[3]
    assert state_bytes(other, bystander) == bystander_bytes  # other sessions are unaffected


def _frame_offsets(path: str) -> list[int]:
    from serving.checkpoint.records import HEAD, TAG_BYTES

    offsets, data, at = [], open(path, "rb").read(), 0
    while at < len(data):
        offsets.append(at)
        at += HEAD.size + HEAD.unpack_from(data, at)[2] + TAG_BYTES
    return offsets


def test_a_deleted_snapshot_falls_back_or_fails_naming_the_session(model, tmp_path):
    live = engine_on(model, tmp_path)  # a snapshot at the first reply after 3 records: after steps 2, 4 and 6
    s = live.create()
    seen = run_steps(live, s, range(1, 7))
    live.flush()
    names = sorted(os.listdir(session_dir(live, s)))
    points = [n for n in names if n.endswith(".point")]
    assert not any(n.startswith("log-") for n in names)  # the log was just folded into a snapshot
    os.remove(os.path.join(session_dir(live, s), points[-1]))  # the newest point: step 6's Mamba states
    other = engine_on(model, tmp_path)
    info = other.session_info(s)  # back to the newest whole snapshot: the end of step 4
    assert (info.step, info.durable_step) == (4, 4)
    assert digest(other, s) == seen[4]
    segments = [n for n in names if n.endswith(".segment")]
    os.remove(os.path.join(session_dir(live, s), segments[0]))  # the first K/V rows: nothing is whole
    with pytest.raises(SessionLogError, match=f"session {s[:8]}… has no intact state"):
        engine_on(model, tmp_path).session_info(s)


def test_rollback_beyond_the_memory_ring_comes_from_the_log(model, tmp_path, uninterrupted):
    """The ring holds one step; the log has the records since the last snapshot (steps 5
    to 7) and every snapshot's point (the end of step 4)."""
    live = engine_on(model, tmp_path, rollback_window=1, checkpoint=CheckpointPolicy(snapshot_every=8))
    s = live.create()
    seen = run_steps(live, s, range(1, 8))
    reference, r, _ = uninterrupted
    at_five = reference.fork(r)
    reference.rollback(at_five, 5)  # the reference's ring holds them all
    assert live.rollback(s, 5).step == 5  # from a record
    assert digest(live, s) == seen[5]
    assert continuation(live, s) == continuation(reference, at_five)
    assert live.rollback(s, 4).step == 4  # from a snapshot's point
    assert digest(live, s) == seen[4]
    with pytest.raises(ValueError, match=r"step 2 is not a rollback target any more; the log keeps steps \[4\]"):
        live.rollback(s, 2)
    live.flush()
    assert state_bytes(engine_on(model, tmp_path), s) == state_bytes(live, s)  # the rolled-back branch is restored


def test_a_store_slower_than_the_steps_merges_each_step_and_pushes_back(model, tmp_path):
    """While the writer is behind, a reply's record merges into its step's observation
    record (one write of the Mamba states per step, not two; steps never merge, so each
    stays a rollback target), and past ``max_queued`` waiting records a call waits for the
    writer instead of filling memory. Holding the writer stands for a slow store."""
    live = engine_on(model, tmp_path, rollback_window=1, checkpoint=CheckpointPolicy(snapshot_every=100, max_queued=3))
    s = live.create()
    writer, seen = live.sessions.writer, {}
    with writer.held():
        seen.update(run_steps(live, s, range(1, 4)))  # six changes, three records
        log = live.sessions.get(s).log
        assert len(log._jobs) == 3 and live.session_info(s).durable_step == 0
        blocked = threading.Thread(target=lambda: seen.update(run_steps(live, s, range(4, 5))))
        blocked.start()
        blocked.join(timeout=2)
        assert blocked.is_alive()  # step 4 waits for the store
    blocked.join()
    live.flush()
    assert writer.stats.records in (4, 5)  # steps 1 to 3 merged; step 4's reply may follow its written observation
    assert live.session_info(s).durable_step == 4
    for step in (4, 2):  # every step's end is still in the log
        assert live.rollback(s, step).step == step and digest(live, s) == seen[step]


def test_the_retention_policy_keeps_the_newest_points(model, tmp_path):
    live = engine_on(model, tmp_path, rollback_window=1, checkpoint=CheckpointPolicy(snapshot_every=2, keep_points=2))
    s = live.create()
    seen = run_steps(live, s, range(1, 7))  # a snapshot at the end of every step
    live.flush()
    points = sorted(n for n in os.listdir(session_dir(live, s)) if n.endswith(".point"))
    assert len(points) == 2  # steps 5 and 6; the older points were deleted
    with pytest.raises(ValueError, match=r"the log keeps steps \[5, 6\]"):
        live.rollback(s, 4)
    assert live.rollback(s, 5).step == 5 and digest(live, s) == seen[5]


def test_any_fsspec_filesystem_with_the_guarantees_will_do(model):
    """fsspec's in-memory filesystem appends, renames and creates exclusively, so it holds
    sessions as well as a directory does (within one process)."""
    url = "memory://longllava-test-store"
    live = Engine(model, device="cpu", checkpoint_dir=url, checkpoint=CheckpointPolicy(snapshot_every=3))
    s = live.create()
    seen = run_steps(live, s, range(1, 5))
    child = live.fork(s)
    live.flush()
    other = Engine(model, device="cpu", checkpoint_dir=url)
    assert other.adopt(s).step == 4 and digest(other, s) == seen[4]
    assert state_bytes(other, child) == state_bytes(live, child)
    assert not live.sessions.get(s).log.owned()  # the adopting engine took it over


def test_a_fork_is_durable_by_itself(model, tmp_path):
    live = engine_on(model, tmp_path)
    parent = live.create()
    run_steps(live, parent, range(1, 5))
    child = live.fork(parent)
    run_steps(live, child, range(5, 7))
    grandchild = live.fork(child)
    expected = {x: state_bytes(live, x) for x in (child, grandchild)}
    live.close(parent)  # the parent is gone from memory and from the store
    live.shutdown()  # everything queued is written
    assert not os.path.exists(session_dir(live, parent))
    other = engine_on(model, tmp_path)
    for x in (child, grandchild):
        assert state_bytes(other, x) == expected[x]
    with pytest.raises(UnknownSessionError):
        other.session_info(parent)


def test_a_takeover_fences_the_stale_owner(model, tmp_path):
    """Two engines never both write one session: the new owner takes over at once, and
    the old one's writes after that are refused and never restored."""
    a = engine_on(model, tmp_path)
    s = a.create()
    run_steps(a, s, range(1, 3))
    a.flush()
    stale = a.sessions.get(s)
    b = engine_on(model, tmp_path)
    at_takeover = state_bytes(b, s)  # b restored it: owner generation 2
    a_live = a.sessions.get(s)
    assert a_live is stale and not stale.log.owned()  # a sees it at once
    stale.steps.add(stale.state.length, b"x" * 16)  # a stale write that slipped past the check
    stale.record("append", first_step=stale.steps.last - 1)
    with pytest.raises(Exception, match="taken over"):
        stale.log.wait()
    assert state_bytes(engine_on(model, tmp_path), s) == at_takeover  # its record is not on the chain
    # a's next call takes the session back (generation 4), and b then finds itself fenced
    assert a.append(s, worker.observation(3), step=3).step == 3
    assert not b.sessions.get(s).log.owned()


def test_foreign_or_corrupt_store_directories_are_refused(model, tmp_path):
    (tmp_path / "notes.txt").write_text("someone else's files")
    with pytest.raises(SessionLogError, match="not empty and is not a session store"):
        engine_on(model, tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "longllava-sessions.json").write_text("{not json")
    with pytest.raises(SessionLogError, match="not a valid store marker"):
        engine_on(model, bad)
    store = tmp_path / "store"
    live = engine_on(model, store)
    s = live.create()
    run_steps(live, s, range(1, 2))
    live.flush()
    with pytest.raises(UnknownSessionError):
        live.session_info("../../etc")
    with pytest.raises(UnknownSessionError):
        live.append("x" * 10_000, "hi")
    other_model = default_model(pretrained=False, seed=1)  # the same layout, other weights
    with pytest.raises(SessionLogError, match="written by another model"):
        engine_on(other_model, store).session_info(s)


def test_an_authenticated_store_refuses_edited_records(model, tmp_path):
    """CRC32 and SHA-256 catch accidents; only the key catches an edit that fixes them up."""
    key = b"k" * 32
    live = Engine(model, device="cpu", store=DirectoryStore(tmp_path, key=key))
    s = live.create()
    run_steps(live, s, range(1, 3))
    live.flush()
    with pytest.raises(SessionLogError, match="failed its authentication check"):
        Engine(model, device="cpu", store=DirectoryStore(tmp_path, key=b"another key")).session_info(s)
    with pytest.raises(SessionLogError, match="failed its authentication check"):
        Engine(model, device="cpu", checkpoint_dir=tmp_path).session_info(s)  # no key: the tags do not match
    keyed = Engine(model, device="cpu", store=DirectoryStore(tmp_path, key=key))
    assert state_bytes(keyed, s) == state_bytes(live, s)


def _mount(where, options: str):
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return where


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs) that a store can really fill up, and a read-only one."""
    full, read_only = _mount(tmp_path / "disk", "size=2m"), _mount(tmp_path / "ro", "size=1m,ro")
    yield full, read_only
    for where in (full, read_only):
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_or_read_only_store_gives_a_clear_error_and_loses_nothing(model, small_disk):
    small_disk, read_only = small_disk
    live = engine_on(model, small_disk / "store")
    s = live.create()
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (_free(small_disk) - 600_000))  # room for about one step
    with pytest.raises(StoreUnavailableError, match="No space left") as full:
        for n in range(1, 10):
            live.append(s, worker.observation(n), step=n)
            live.generate_text(s, GREEDY, step=n)
            live.flush(s)
    assert full.value.__cause__.errno == errno.ENOSPC
    info = live.session_info(s)
    kept = state_bytes(live, s)  # in memory, unchanged by the failed writes
    with pytest.raises(StoreUnavailableError, match="retry when the store is writable"):
        live.append(s, worker.observation(info.step + 1), step=info.step + 1)
    assert state_bytes(live, s) == kept and live.session_info(s) == info
    ballast.unlink()
    live.sessions.get(s).log.retry()  # room again: what failed is written now
    assert live.session_info(s).durable_step == info.step
    assert state_bytes(engine_on(model, small_disk / "store"), s) == kept
    with pytest.raises(StoreUnavailableError, match="Read-only file system"):
        engine_on(model, read_only / "store")


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_oversized_observations_are_refused_before_any_image_is_encoded(model):
    engine = Engine(model, device="cpu", max_chunk_tokens=1000)
    s = engine.create()
    encoded = []
    real = engine.model.encode_images
    engine.model.encode_images = lambda images: encoded.append(len(images)) or real(images)
    screenshots = [worker.observation(i)[1] for i in range(300)]
    per_image = model.config.image_tokens + 11  # its rows and the markup around them
    with pytest.raises(ValueError, match=rf"this append is {300 * per_image} tokens \(300 images\), over the engine's max_chunk_tokens=1000"):
        engine.append(s, screenshots)
    assert encoded == []
    assert engine.session_info(s).length == 0


KERNEL_CHOICE = """
from model import ops
from model.default import default_model
from serving.engine import Engine
try:
    Engine(default_model(), device="cpu", kernels="triton")
except RuntimeError as e:
    print("refused:", e)
print("choice:", ops.resolve("cpu"))
Engine(default_model(), device="cpu")
print("a later engine starts")
"""


def test_a_bad_kernel_choice_leaves_the_process_choice_alone():
    """Without Triton's interpreter (which the other tests run under), Triton on the CPU is
    refused before the process-wide choice changes, so later engines start as before."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHOICE], capture_output=True, text=True, env=env, check=True)
    assert "refused: Triton kernels run on CUDA tensors" in done.stdout
    assert "choice: torch" in done.stdout and "a later engine starts" in done.stdout


EVICTION_WORKER = """
import json, resource, sys
import torch
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import episode_worker as worker
from model.default import default_model
from serving.engine import Engine
from serving.types import SamplingParams

torch.set_num_threads(1)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
model = default_model()
budget = {budget}
kw = dict(checkpoint_dir={store!r}, max_resident_bytes=budget) if budget else dict()
engine = Engine(model, device="cpu", **kw)
greedy = SamplingParams(max_new_tokens=3, ignore_eos=True)
warm = engine.create()  # one step first: kernel caches, the writer's threads and other one-time costs
engine.append(warm, [worker.Text("warm up")], step=1)
engine.generate_text(warm, greedy, step=1)
engine.close(warm)
sessions = [engine.create() for _ in range({n})]
base, peak, replies = rss(), 0, []
for round in (1, 2):
    for i, s in enumerate(sessions):
        engine.append(s, [worker.Text(f"session {{i}} round {{round}}")], step=round)
        replies.append(engine.generate_text(s, greedy, step=round)[0])
        peak = max(peak, rss() - base)
print(json.dumps({{"replies": replies, "peak": peak, "resident": len(engine.sessions),
                  "per_session": engine.state_of(sessions[0]).resident_nbytes}}))
"""


def test_200_sessions_under_a_budget_for_20(tmp_path):
    """Every session's greedy output is what it is with no budget, and memory stays within
    the budget plus a stated overhead (measured in fresh processes, as RSS growth)."""
    def run(budget):
        code = EVICTION_WORKER.format(
            tests=os.path.dirname(worker.__file__), root=os.getcwd(), store=str(tmp_path / "store"), budget=budget, n=200
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(done.stdout.splitlines()[-1])

    free = run(0)
    per_session = free["per_session"]
    budget = 20 * per_session
    bounded = run(budget)
    assert bounded["replies"] == free["replies"]
    assert bounded["resident"] <= 21
    overhead = 16 * 2**20  # the writer's queue, allocator slack, restored-session copies in flight
    assert bounded["peak"] <= budget + overhead < free["peak"]
