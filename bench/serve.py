"""Serving over Ray Serve: what HTTP and Serve add to a step, how decode scales with
concurrent sessions, how long a failover takes, and how far the checkpoint log lags.

It starts Ray and Serve on 127.0.0.1 and deploys ``serving.app`` twice on the embedded
default model: ``one`` (one replica) and ``two`` (two replicas sharing a checkpoint
store). Every request goes over real HTTP through ``agent.RemoteBackend`` (msgpack, images
as PNG). Next to the app, an in-process ``Engine`` with the same weights and the same
checkpoint settings runs the same steps, and the served replies are checked against it.

- **Step latency.** One session on ``two`` and one in-process grow one step at a time: a
  screenshot (36 tokens on the embedded model; ``--image-tokens 144`` for LongLLaVA's 144)
  plus a line of text, then an 8-token greedy reply (the steps of ``bench/checkpoint.py``).
  A served step is one request, ``POST /v1/sessions/{id}/step`` (``RemoteBackend.step``, as
  ``Agent.step`` sends it). At 10, 100 and 500 steps the next ``2 x rounds`` steps are
  timed in interleaved order, alternating which goes first; every other served step goes
  as two requests instead (``append``, then ``generate``), for comparison on the same
  session. Each round also times one ``GET`` of the session's info: a request's round trip
  through HTTP and both deployments, with no model work.
- **Failover.** Right after each of those, the next observation is appended, the replica
  holding the session is killed (``ray.kill``), and its 1-token reply is asked for: the
  time from the kill to that token, which the other replica serves after restoring the
  session from the store. Next to it, the time a new in-process engine takes to restore
  the in-process session (the same history) from its own store. Then Serve's replacement
  replica is waited for.
- **Decode rate.** 1, 8 and 32 sessions on ``one`` generate 64 tokens each at once; the
  aggregate rate is every token over the wall-clock time (the median of ``decode_rounds``
  rounds). The same in-process, with a thread per session (the engine batches them the
  same way), in alternating order with the served rounds.
- **Load.** 32 sessions step at once, ``load_steps`` steps each (a line of text, then an
  8-token reply), on ``one`` and on ``two``: step latency percentiles, errors, and the
  checkpoint lag (step minus durable step) of every reply.

Ray starts its workers at niceness 15, below this process: on a machine that other work
shares, that alone slows the replicas against the in-process engine. ``--worker-niceness 0``
puts them on an equal footing, to measure what HTTP and Serve themselves add.

    python -m bench.serve --out docs/bench/serve.json
    python -m bench.serve --worker-niceness 0 --out docs/bench/serve-nice0.json
    python -m bench.serve --steps 10 50 --rounds 3 --load-steps 5   # quicker
    python -m bench.serve --parts latency --out docs/bench/serve-step.json   # step latency only
    python -m bench.serve --parts latency --image-tokens 144   # with 144-token screenshots
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from agent import RemoteBackend
from bench.checkpoint import REPLY, observation, restore_s
from model.prompt import Text, user_message
from serving.engine import Engine
from serving.types import SamplingParams

ROLLBACK_WINDOW = 16  # as the app's default
FIRST_TOKEN = SamplingParams(max_new_tokens=1, ignore_eos=True)
DECODE = SamplingParams(max_new_tokens=64, ignore_eos=True)
APPS = {"one": 1, "two": 2}  # the apps and their replicas
PARTS = {"latency": {"two"}, "failover": {"two"}, "decode": {"one"}, "load": {"one", "two"}}  # the parts and the apps they use


# ---------------------------------------------------------------------------- the app
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_copy(root: Path, image_tokens: int | None) -> str | None:
    """None: the embedded default model as it ships. Else a copy of its weights whose images
    pool to ``image_tokens`` (144: the 12x12 grid its 168 px tower gives, unpooled), for
    steps of the size LongLLaVA's own 144-token images make."""
    from model.default import DEFAULT_CONFIG, WEIGHTS_DIR

    if image_tokens is None or image_tokens == DEFAULT_CONFIG.image_tokens:
        return None
    path = root / f"default-{image_tokens}"
    shutil.copytree(WEIGHTS_DIR, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "image_tokens": image_tokens}, indent=1))
    return str(path)


def start_apps(root: Path, worker_niceness: int | None = None, names: set[str] = frozenset(APPS), model: str | None = None) -> dict[str, str]:
    """Ray, Serve and the apps ``names`` on 127.0.0.1, serving ``model`` (None: the embedded
    default); each app's URL. Ray runs its workers (the replicas among them) at
    ``worker_niceness``, 15 unless set."""
    from serving.application import AppArgs, app

    if worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(worker_niceness)

    built = {  # built before Ray starts: the builder keeps Ray on loopback
        name: app(AppArgs(model=model, checkpoint_dir=str(root / name), replicas=replicas, cpus_per_replica=1))
        for name, replicas in APPS.items() if name in names
    }
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20, namespace="serve", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, application in built.items():
        serve.run(application, name=name, route_prefix=f"/{name}")
    return {name: f"http://127.0.0.1:{port}/{name}" for name in built}


def replica_actor(app: str, replica: str):
    import ray

    return ray.get_actor(f"SERVE_REPLICA::{app}#ModelReplica#{replica}", namespace="serve")


def wait_for_replicas(app: str, replicas: int, timeout_s: float = 300.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while serve.status().applications[app].deployments["ModelReplica"].replica_states != {"RUNNING": replicas}:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve did not bring {app} back to {replicas} replicas")
        time.sleep(0.5)


# ---------------------------------------------------------------------------- one episode, served and in-process
class Pair:
    """One session on the app and one in-process, taking the same steps; the served
    replies must equal the in-process ones."""

    def __init__(self, url: str, engine: Engine):
        self.backend, self.engine = RemoteBackend(url), engine
        self.served, self.local = self.backend.create(), engine.create()
        self.steps = 0
        self.replies: dict[str, list[int]] = {}

    def step_served(self, n: int, sampling: SamplingParams = REPLY) -> float:
        """One request: the observation and its reply (``POST .../step``)."""
        t = time.perf_counter()
        self.replies["served"] = self.backend.step(self.served, observation(n), n, sampling).generation.token_ids
        return time.perf_counter() - t

    def step_served_apart(self, n: int, sampling: SamplingParams = REPLY) -> float:
        """Two requests: the append, then the generation."""
        t = time.perf_counter()
        self.backend.append(self.served, observation(n), step=n)
        self.replies["served"] = self.backend.generate(self.served, sampling, n).token_ids
        return time.perf_counter() - t

    def step_local(self, n: int, sampling: SamplingParams = REPLY) -> float:
        t = time.perf_counter()
        self.engine.append(self.local, observation(n), step=n)
        self.replies["local"] = [e.token_id for e in self.engine.generate(self.local, sampling, n) if e.token_id is not None]
        return time.perf_counter() - t

    def step(self, timed: dict[str, list[float]] | None = None, apart: bool = False, served_first: bool = True) -> None:
        """The next step, served (in one request, or ``apart`` in two) and in-process;
        their seconds into ``timed`` under ``served`` (``served_apart``) and ``local``."""
        n = self.steps = self.steps + 1
        served = ("served_apart", self.step_served_apart) if apart else ("served", self.step_served)
        for name, run in (served, ("local", self.step_local)) if served_first else (("local", self.step_local), served):
            seconds = run(n)
            if timed is not None:
                timed[name].append(seconds)
        assert self.replies["served"] == self.replies["local"], f"step {n}: the served reply differs from the engine's"

    def failover(self, app: str) -> dict:
        """Append the next step, kill the replica holding the session, and time its 1-token reply."""
        n = self.steps = self.steps + 1
        history = self.engine.session_info(self.local).length
        self.step_local(n, FIRST_TOKEN)
        replica = self.backend.info(self.served)["replica"]
        self.backend.append(self.served, observation(n), step=n)
        import ray

        failovers, replays = self.backend.failovers, self.backend.replays
        ray.kill(replica_actor(app, replica), no_restart=True)
        t = time.perf_counter()
        self.replies["served"] = self.backend.generate(self.served, FIRST_TOKEN, n).token_ids
        seconds = time.perf_counter() - t
        assert self.replies["served"] == self.replies["local"], f"step {n}: the reply after the failover differs"
        assert self.backend.info(self.served)["replica"] != replica
        return {"steps": n - 1, "history_tokens": history, "kill_to_first_token_s": seconds,
                "ingress_retries": self.backend.failovers - failovers, "client_replays": self.backend.replays - replays}


def latency_and_failover(url: str, engine: Engine, store: Path, milestones: list[int], rounds: int,
                         parts: set[str]) -> tuple[list[dict], list[dict]]:
    """The step latency and (with ``failover`` in ``parts``) the failover at each milestone."""
    pair = Pair(url, engine)
    latency, failover = [], []
    for m in milestones:
        while pair.steps < m:
            pair.step()
        if "latency" in parts:
            latency.append(step_latency(pair, m, rounds))
        if "failover" not in parts:
            continue
        failover.append(pair.failover("two"))
        engine.flush(pair.local)
        failover[-1]["local_restore_s"] = restore_s(engine.model, store, pair.local, reps=1)[0]
        print(f"  failover at {m} steps: {failover[-1]['kill_to_first_token_s']:.2f} s from the kill to the first token", flush=True)
        wait_for_replicas("two", 2)
    return latency, failover


def step_latency(pair: Pair, milestone: int, rounds: int) -> dict:
    """``rounds`` steps of each served kind (one request, two requests) beside as many
    in-process, interleaved, alternating which goes first; medians."""
    timed = {"served": [], "served_apart": [], "local": []}
    history = pair.engine.session_info(pair.local).length
    requests = []
    for i in range(2 * rounds):
        pair.step(timed, apart=i % 2 == 1, served_first=i // 2 % 2 == 0)
        if i % 2 == 0:
            t = time.perf_counter()
            pair.backend.info(pair.served)
            requests.append(time.perf_counter() - t)
    median = {name: statistics.median(seconds) * 1000 for name, seconds in timed.items()}
    served, apart, local = median["served"], median["served_apart"], median["local"]
    print(f"history {milestone} steps: one request {served:.0f} ms, two requests {apart:.0f} ms, in-process {local:.0f} ms "
          f"({served / local - 1:+.0%}, {apart / local - 1:+.0%})", flush=True)
    return {"steps": milestone, "history_tokens": history, "served_ms": served, "served_apart_ms": apart, "local_ms": local,
            "overhead": served / local - 1, "overhead_apart": apart / local - 1, "request_ms": statistics.median(requests) * 1000,
            **{f"{name}_all_ms": [s * 1000 for s in seconds] for name, seconds in timed.items()}}


# ---------------------------------------------------------------------------- decode rate
def at_once(count: int, work: Callable[[int], object]) -> float:
    """Wall-clock seconds for ``count`` threads, released together, to each do ``work(i)``."""
    start = threading.Barrier(count + 1)

    def run(i: int):
        start.wait()
        return work(i)

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(run, i) for i in range(count)]
        start.wait()
        t = time.perf_counter()
        for f in futures:
            f.result()
        return time.perf_counter() - t


def decode_rate(url: str, engine: Engine, counts: list[int], rounds: int) -> list[dict]:
    """Each round appends a line to every session, then times their generations at once,
    served and in-process in alternating order; the medians of the rounds."""
    rows = []
    for count in counts:
        backends = [RemoteBackend(url) for _ in range(count)]
        served = [b.create() for b in backends]
        local = [engine.create() for _ in range(count)]
        generate = {
            "served": lambda i, k: backends[i].generate(served[i], DECODE, k),
            "local": lambda i, k: list(engine.generate(local[i], DECODE, k)),
        }
        seconds = {"served": [], "local": []}
        for k in range(1, rounds + 1):
            for i in range(count):
                pieces = user_message([Text(f"session {i}, round {k}: say something")])
                backends[i].append(served[i], pieces, step=k)
                engine.append(local[i], pieces, step=k)
            for side in ("served", "local") if k % 2 else ("local", "served"):
                seconds[side].append(at_once(count, lambda i: generate[side](i, k)))
        tokens = count * DECODE.max_new_tokens
        rows.append({"sessions": count, **{f"{side}_tokens_s": tokens / statistics.median(s) for side, s in seconds.items()}})
        print(f"{count} sessions: served {rows[-1]['served_tokens_s']:.0f} tokens/s, in-process {rows[-1]['local_tokens_s']:.0f} tokens/s", flush=True)
        for b, s in zip(backends, served):
            b.close(s)
        for s in local:
            engine.close(s)
    one = rows[0]
    for r in rows:
        r["served_speedup"], r["local_speedup"] = r["served_tokens_s"] / one["served_tokens_s"], r["local_tokens_s"] / one["local_tokens_s"]
    return rows


# ---------------------------------------------------------------------------- load
def load(url: str, sessions: int, steps: int) -> dict:
    """``sessions`` episodes at once, ``steps`` steps each: step latencies, errors, and the
    checkpoint lag at each reply."""
    errors, seconds, lag = [], [], []

    def episode(i: int) -> None:
        backend = RemoteBackend(url)
        try:
            session = backend.create()
            for k in range(1, steps + 1):
                t = time.perf_counter()
                backend.append(session, user_message([Text(f"session {i}, step {k}: what now?")]), step=k)
                reply = backend.generate(session, REPLY, k)
                seconds.append(time.perf_counter() - t)
                lag.append(k - reply.durable_step)
            backend.close(session)
        except Exception as exc:  # counted, not raised: the load goes on for the others
            errors.append(repr(exc))

    wall = at_once(sessions, episode)
    seconds.sort()
    return {
        "sessions": sessions, "steps": steps, "errors": len(errors), "error_examples": errors[:3], "wall_s": wall,
        "steps_s": len(seconds) / wall, "p50_ms": percentile(seconds, 0.5) * 1000, "p99_ms": percentile(seconds, 0.99) * 1000,
        "lag_median": statistics.median(lag), "lag_p99": percentile(sorted(lag), 0.99), "lag_max": max(lag),
    }


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------- report
def tables(r: dict) -> str:
    """A table for each part that ran."""
    out = []
    if r.get("latency"):
        out += ["| history (steps / tokens) | HTTP + Serve, one request (ms) | in-process (ms) | overhead | "
                "two requests (ms) | overhead | one GET round trip (ms) |", "|---|---|---|---|---|---|---|"]
        out += [f"| {x['steps']} / {x['history_tokens']} | {x['served_ms']:.0f} | {x['local_ms']:.0f} | {x['overhead']:+.0%} | "
                f"{x['served_apart_ms']:.0f} | {x['overhead_apart']:+.0%} | {x['request_ms']:.0f} |" for x in r["latency"]]
    if r.get("failover"):
        out += ["", "| history (steps / tokens) | kill to first token (s) | in-process restore (s) | ingress retries | steps replayed by the client |",
                "|---|---|---|---|---|"]
        out += [f"| {x['steps']} / {x['history_tokens']} | {x['kill_to_first_token_s']:.2f} | {x['local_restore_s']:.2f} | {x['ingress_retries']} | "
                f"{x['client_replays']} |" for x in r["failover"]]
    if r.get("decode"):
        out += ["", "| sessions | HTTP + Serve (tokens/s) | x one session | in-process (tokens/s) | x one session |", "|---|---|---|---|---|"]
        out += [f"| {x['sessions']} | {x['served_tokens_s']:.0f} | {x['served_speedup']:.1f}x | {x['local_tokens_s']:.0f} | {x['local_speedup']:.1f}x |"
                for x in r["decode"]]
    if r.get("load"):
        out += ["", "| replicas | sessions x steps | errors | steps/s | p50 (ms) | p99 (ms) | lag median / p99 / max (steps) |", "|---|---|---|---|---|---|---|"]
        out += [f"| {x['replicas']} | {x['sessions']} x {x['steps']} | {x['errors']} | {x['steps_s']:.1f} | {x['p50_ms']:.0f} | {x['p99_ms']:.0f} | "
                f"{x['lag_median']:g} / {x['lag_p99']:g} / {x['lag_max']:g} |" for x in r["load"]]
    return "\n".join(out).strip("\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", nargs="+", type=int, default=[10, 100, 500], help="history lengths for latency and failover")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timed steps per history length (of each served kind)")
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS), help="what to measure (default: all)")
    p.add_argument("--sessions", nargs="+", type=int, default=[1, 8, 32], help="concurrent sessions for the decode rate")
    p.add_argument("--decode-rounds", type=int, default=5, help="timed generations per session count (median reported)")
    p.add_argument("--load-sessions", type=int, default=32)
    p.add_argument("--load-steps", type=int, default=30)
    p.add_argument("--image-tokens", type=int, choices=(36, 144), default=None,
                   help="tokens per screenshot (default: the embedded model's own, 36; 144: its weights with the grid unpooled)")
    p.add_argument("--worker-niceness", type=int, default=None, help="the replicas' niceness (Ray's default: 15; this process runs at 0)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/serve.json"))
    args = p.parse_args()
    torch.set_num_threads(1)  # as each replica
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    parts = set(args.parts)
    model = model_copy(root, args.image_tokens)
    urls = start_apps(root, args.worker_niceness, set().union(*(PARTS[part] for part in parts)), model)
    engine = Engine.from_pretrained(model, device="cpu", checkpoint_dir=root / "in-process", rollback_window=ROLLBACK_WINDOW)
    result = {"command": "python -m bench.serve " + " ".join(sys.argv[1:]), "machine": machine(),
              "image_tokens": engine.model.config.image_tokens}
    if parts & {"latency", "failover"}:
        result["latency"], result["failover"] = latency_and_failover(urls["two"], engine, root / "in-process", args.steps, args.rounds, parts)
    if "decode" in parts:
        result["decode"] = decode_rate(urls["one"], engine, args.sessions, args.decode_rounds)
    if "load" in parts:
        result["load"] = [{"replicas": n, **load(urls[name], args.load_sessions, args.load_steps)} for name, n in APPS.items()]
    print(tables(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    engine.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "load_average": os.getloadavg(),
            "worker_niceness": int(os.environ.get("RAY_worker_niceness", 15))}


if __name__ == "__main__":
    main()
