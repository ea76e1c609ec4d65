"""Load: 32 sessions step at once through HTTP, 30 steps each, on one replica and on two.
No request fails, and once they are idle every replica holds no more than its memory
budget (the rest were evicted to the store, and came back when called)."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent import RemoteBackend
from model.prompt import Text
from serving.types import SamplingParams

from served_app import BUDGET, metric

SESSIONS, STEPS = 32, 30


def episode(app, i: int) -> list[float]:
    backend = RemoteBackend(app.url, api_key=app.api_key)
    session = backend.create()
    seconds = []
    for k in range(1, STEPS + 1):
        began = time.perf_counter()
        backend.append(session, [Text(f"{k} ")], step=k)  # small steps: the load is the point
        backend.generate(session, SamplingParams(max_new_tokens=1), k)
        seconds.append(time.perf_counter() - began)
    info = backend.info(session)
    assert info["step"] == STEPS and info["durable_step"] is not None
    return seconds, info["replica"], backend, session


@pytest.mark.parametrize("which", ["one", "two"])
def test_32_sessions_at_once(served, which):
    app = getattr(served, which)
    with ThreadPoolExecutor(SESSIONS) as pool:
        results = list(pool.map(lambda i: episode(app, i), range(SESSIONS)))  # any error fails the test here
    steps = sorted(s for r in results for s in r[0])
    p50, p99 = statistics.median(steps), steps[int(0.99 * len(steps))]
    print(f"\n{SESSIONS} sessions x {STEPS} steps on {app.replicas} replica(s): step p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    replicas = {r[1] for r in results}
    assert len(replicas) == app.replicas
    time.sleep(4)  # the replicas report every 2 s, and Ray exports every second
    held = {r: v for r, v in metric(served, "longllava_state_bytes", app.name).items() if r in replicas}
    evicted = metric(served, "longllava_sessions_evicted_total", app.name)
    assert held.keys() == replicas and all(v <= BUDGET for v in held.values()), held
    assert sum(evicted.values()) > 0  # 32 sessions do not fit: the budget was kept by evicting
    for _, _, backend, session in results:
        backend.close(session)
