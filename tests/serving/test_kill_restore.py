"""A session survives its process: SIGKILL mid-episode, restore in a new process, continue.

Real processes (``episode_worker.py``, forked from a server that has imported the model),
a real directory store, real SIGKILLs: some at
random moments, some while a checkpoint frame is half written. The client here behaves
as a remote agent would: it trusts only the steps acknowledged as durable and re-sends
everything after them, with their step numbers. The continued episode must give the
same greedy replies, token for token, as an uninterrupted one, and end with the same
history and state: a step applied twice, or lost, would change both.
"""

import multiprocessing
import os
import random
import signal
from pathlib import Path

import pytest
import torch

import episode_worker as worker
from model.default import default_model
from serving.engine import Engine

KILLS = 20


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted episode, in this process and with no store."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker: the same arithmetic, bit for bit
    try:
        engine = Engine(default_model(), device="cpu")
        session = engine.create()
        replies = {}
        for n in range(1, worker.STEPS + 1):
            engine.append(session, worker.observation(n), step=n)
            replies[n] = "".join(e.text for e in engine.generate(session, worker.SAMPLING, step=n))
        return replies, worker.fingerprint(engine, session)
    finally:
        torch.set_num_threads(threads)


CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["episode_worker"])  # torch, the model and the engine, imported once


class Run:
    """One worker process, killable with a real SIGKILL, and the events it sends."""

    def __init__(self, store: Path, session: str, from_step: int, hang_after: int = 0):
        self.events, send = CONTEXT.Pipe(duplex=False)
        args = (send, str(store), session, from_step, hang_after)
        self.proc = CONTEXT.Process(target=worker.run_piped, args=args, daemon=True)
        self.proc.start()
        send.close()

    def lines(self):
        while self.events.poll(300):  # a hung run fails the test instead of hanging it
            try:
                yield self.events.recv()
            except EOFError:
                return

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join()
        assert self.proc.exitcode == -signal.SIGKILL


def test_sigkilled_episode_continues_exactly(tmp_path, reference):
    replies, final = reference
    rng = random.Random(8)
    session, acked, kills, kinds = "new", 0, 0, []
    while True:
        hang_after = rng.randint(1, 5) if kills % 3 == 2 else 0  # every third kill lands inside a frame write
        kill_after = rng.randint(1, 3) if kills < KILLS else None  # replies to read before a timed kill
        run = Run(tmp_path, session, acked + 1, hang_after if kills < KILLS else 0)
        seen = 0
        for event in run.lines():
            if event["event"] == "ready":
                session = event["session"]
                assert event["durable"] >= acked, "a step acknowledged as durable was lost"
            elif event["event"] == "reply":
                assert event["text"] == replies[event["step"]], f"step {event['step']} replied differently"
                acked = max(acked, event["durable"])
                seen += 1
                if kill_after is not None and not hang_after and seen >= kill_after:
                    break
            elif event["event"] == "appended":
                acked = max(acked, event["durable"])
            elif event["event"] == "hanging":
                kinds.append(event["path"].split("-")[0])
                break
            elif event["event"] == "done":
                assert {k: event[k] for k in final} == final  # same history and state: nothing applied twice
                break
        else:
            run.proc.join()
            pytest.fail(f"the worker exited early (code {run.proc.exitcode})")
        if event["event"] == "done":
            break
        run.kill()
        kills += 1
    assert kills >= KILLS
    assert kinds, "no kill landed inside a frame write"
