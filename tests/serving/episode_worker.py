"""A real process running one agent episode on an Engine with a checkpoint store.

The kill tests start it (``run_piped`` in a child of a fork server, which has imported
torch and the model once, so a start costs a fork rather than seconds of imports), read
its events, kill it with SIGKILL at some point, and start it again from the first step
whose durability was not acknowledged. Run by path, it prints its events as JSON lines. ``--hang-after K`` makes the K-th checkpoint frame it writes stop half
way (after flushing that half to disk) and hang there, so that a kill lands inside a
record or snapshot write: a real torn write, which a crash can leave behind.

    python tests/serving/episode_worker.py --store DIR --session new --from-step 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project, when run by path

from model.default import default_model  # noqa: E402
from model.prompt import Image, Text, user_message  # noqa: E402
from model.state_codec import state_to_bytes  # noqa: E402
from serving.checkpoint import CheckpointPolicy  # noqa: E402
from serving.checkpoint.records import MAGIC  # noqa: E402
from serving.engine import Engine  # noqa: E402
from serving.types import SamplingParams  # noqa: E402

STEPS = 40
SAMPLING = SamplingParams(max_new_tokens=4, ignore_eos=True)  # greedy
POLICY = CheckpointPolicy(snapshot_every=5)


def observation(n: int) -> list:
    """Step ``n``'s observation: a screenshot and a line of text."""
    screenshot = np.random.default_rng(n).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return user_message([Image(screenshot), Text(f"step {n}: what now?")])


def fingerprint(engine: Engine, session: str) -> dict:
    s = engine.sessions.get(session)
    return {
        "step": s.steps.last,
        "length": s.state.length,
        "history": hashlib.sha256(s.tokens.tobytes()).hexdigest(),
        "state": hashlib.sha256(state_to_bytes(s.state)).hexdigest(),
    }


def say(event: dict) -> None:
    print(json.dumps(event), flush=True)


def hang_in_frame_write(engine: Engine, after: int, emit) -> None:
    """Make the ``after``-th checkpoint frame written (record, segment or point) stop half way."""
    fs, count = engine.store.fs, [0]
    real_open = fs.open

    def open_(path, mode="rb", **kw):
        f = real_open(path, mode, **kw)
        if mode not in ("ab", "wb"):
            return f
        real_write = f.write

        def write(data):
            if bytes(data[:4]) == MAGIC:
                count[0] += 1
                if count[0] == after:
                    real_write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    emit({"event": "hanging", "path": os.path.basename(str(path))})
                    time.sleep(3600)
            return real_write(data)

        f.write = write
        return f

    fs.open = open_


def run(emit, store: str, session: str, from_step: int, hang_after: int = 0) -> None:
    """The episode from ``from_step`` on, reporting each reply through ``emit``."""
    torch.set_num_threads(1)
    engine = Engine(default_model(), device="cpu", checkpoint_dir=store, checkpoint=POLICY)
    if hang_after:
        hang_in_frame_write(engine, hang_after, emit)
    session = engine.create() if session == "new" else session
    info = engine.session_info(session)
    emit({"event": "ready", "session": session, "step": info.step, "durable": info.durable_step})
    for n in range(from_step, STEPS + 1):
        appended = engine.append(session, observation(n), step=n)
        emit({"event": "appended", "step": n, "tokens": appended.tokens, "durable": appended.durable_step})
        events = list(engine.generate(session, SAMPLING, step=n))
        last = events[-1]
        emit({"event": "reply", "step": n, "text": "".join(e.text for e in events), "tokens": last.tokens,
              "replayed": last.replayed, "durable": last.durable_step})
    engine.flush()
    emit({"event": "done", "durable": engine.session_info(session).durable_step, **fingerprint(engine, session)})


def run_piped(conn, *args) -> None:
    """``run`` in a child process, its events sent through a pipe."""
    run(conn.send, *args)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--session", default="new")
    p.add_argument("--from-step", type=int, default=1)
    p.add_argument("--hang-after", type=int, default=0)
    args = p.parse_args()
    run(say, args.store, args.session, args.from_step, args.hang_after)


if __name__ == "__main__":
    main()
