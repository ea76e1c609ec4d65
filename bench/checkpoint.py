"""What durable sessions cost, and what a restore saves, with 144-token image observations.

For each config, one agent session grows by one step at a time (a screenshot pooled to
144 tokens plus a line of text, then an 8-token greedy reply) on three engines with the
same weights: no store (``off``), a streamed checkpoint log (``on``) and a log that waits
for every write (``sync``). At 10, 100 and 500 steps it times the next steps in
interleaved rounds, rotating which engine goes first: wall-clock time, and the CPU time of
the request path (the calling thread and the engine's model thread: the step's own work,
which load from other processes on a shared machine does not inflate; the writer's
threads are not in it).

Along the way (10, 100, 500, 1000 steps) it copies the ``on`` session's log and times its
restore in a new engine, next to re-prefilling the same history from nothing (encode every
screenshot again, prefill every token, 2048 a chunk): what a server without durable state
must do to take a session over. It also records the bytes the writer wrote per step
against the state's growth, the disk the log takes with compaction on, and the writer's
throughput (while the episode runs, and with a backlog of 64 sessions) against the disk's
own sequential write speed measured here with ``dd``.

    python -m bench.checkpoint --configs default --out docs/bench/checkpoint-default.json
    python -m bench.checkpoint --configs jamba256 --out docs/bench/checkpoint-jamba256.json
    python -m bench.checkpoint --configs jamba256 --steps 10 100 --rounds 5   # quicker
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.append import CONFIGS as LLM_CONFIGS
from model.config import LongLLaVAConfig
from model.default import DEFAULT_CONFIG, default_model
from model.longllava import LongLLaVA
from model.prompt import Image, Text, user_message
from serving.checkpoint import CheckpointPolicy
from serving.engine import Engine
from serving.types import SamplingParams

REPLY = SamplingParams(max_new_tokens=8, ignore_eos=True)
PREFILL_CHUNK = 2048
MODES = ("off", "on", "sync")
IMAGE_TOKENS = 144


def build_model(name: str) -> LongLLaVA:
    """The embedded default model, or an LLM config of ``bench/append.py`` with the default
    model's CLIP tower and projector in front of it; both pool images to ``IMAGE_TOKENS``
    (the shipped model's own setting is 36: pooling has no weights, so only the count changes)."""
    if name == "default":
        shipped = default_model()
        model = LongLLaVA(shipped.config.model_copy(update={"image_tokens": IMAGE_TOKENS}))
        model.load_state_dict(shipped.state_dict())
        return model.eval()
    vision = {k: v for k, v in DEFAULT_CONFIG.model_dump().items() if k.startswith(("mm_", "image_", "vision_"))}
    config = LongLLaVAConfig(**LLM_CONFIGS[name].model_dump(), **{**vision, "image_tokens": IMAGE_TOKENS}, builtin_tokenizer="byte")
    torch.manual_seed(0)
    return LongLLaVA(config).eval()


def observation(n: int) -> list:
    screenshot = np.random.default_rng(n).integers(0, 256, (210, 160, 3), dtype=np.uint8)
    return user_message([Image(screenshot), Text(f"step {n}: what now?")])


def request_path_cpu() -> dict[int, float]:
    """CPU seconds so far of this thread and of every engine's model thread, by thread id:
    the request path's own work. An engine's model thread leaves when idle, so one that
    is gone was idle, and one that is new counts from zero; the writer's threads are not in it."""
    clocks = {}
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.name == "engine-model":
            try:
                clocks[thread.ident] = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, ProcessLookupError):  # it left meanwhile
                pass
    return clocks


def step(engine: Engine, session: str, n: int) -> tuple[float, float]:
    """One agent step; its wall-clock seconds, and the CPU seconds of the request path
    (which other processes' load on a shared machine does not inflate)."""
    t, cpu = time.perf_counter(), request_path_cpu()
    engine.append(session, observation(n), step=n)
    engine.generate_text(session, REPLY, step=n)
    wall, after = time.perf_counter() - t, request_path_cpu()
    return wall, sum(seconds - cpu.get(ident, 0.0) for ident, seconds in after.items())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def dd_write_mb_s(where: Path, mb: int = 256) -> float:
    """The disk's sequential write speed with an fsync at the end, as ``dd`` reports it."""
    target = where / "dd.bin"
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mb}", "conv=fsync"], check=True, capture_output=True)
    seconds = time.perf_counter() - t
    target.unlink()
    return mb / seconds


@torch.no_grad()
def reprefill_s(engine: Engine, session_id: str, steps: int) -> float:
    """Seconds to rebuild ``steps`` steps of history from the observations alone (the
    replies are taken as given text; a real server would have to keep them too)."""
    session = engine.sessions.get(session_id)
    t = time.perf_counter()
    embeds = []
    for n in range(1, steps + 1):
        obs = engine.inputs.process(observation(n))
        embeds.append(engine.inputs.embed(obs))
        reply_start, reply_end = session.steps.observed[n], session.steps.ends[n]
        embeds.append(engine.model.llm.embed_tokens(torch.tensor(session.tokens[reply_start:reply_end])))
    whole = torch.cat(embeds)
    state = engine.model.new_state(max_snapshots=1)
    for start in range(0, whole.shape[0], PREFILL_CHUNK):
        engine.model.prefill(state, whole[start : start + PREFILL_CHUNK], logits="none")
    seconds = time.perf_counter() - t
    assert state.length == session.state.length
    return seconds


def restore_s(model: LongLLaVA, store: Path, session: str, reps: int) -> tuple[float, int]:
    """Median seconds to restore a copy of the session's log in a new engine, and its length."""
    times, length = [], 0
    for _ in range(reps):
        copy = Path(tempfile.mkdtemp(dir=store.parent))
        shutil.copytree(store, copy, dirs_exist_ok=True)
        engine = Engine(model, device="cpu", checkpoint_dir=copy)
        t = time.perf_counter()
        length = engine.sessions.get(session).state.length
        times.append(time.perf_counter() - t)
        engine.shutdown()
        shutil.rmtree(copy)
    return statistics.median(times), length


def saturated(model: LongLLaVA, where: Path, sessions: int = 64, steps: int = 4) -> dict:
    """The writer's throughput with a backlog: ``sessions`` sessions take ``steps`` steps
    while it is held, then it writes everything (each session's records merge into one,
    and the syncs of all sessions run together). MB/s from release to the last sync."""
    engine = Engine(model, device="cpu", checkpoint_dir=where)
    ids = [engine.create() for _ in range(sessions)]
    writer = engine.sessions.writer
    with writer.held():
        for s in ids:
            for n in range(1, steps + 1):
                step(engine, s, n)
        before, t = writer.stats.bytes, time.perf_counter()
    engine.flush()
    seconds = time.perf_counter() - t
    engine.shutdown()
    mb = (writer.stats.bytes - before) / 2**20
    return {"sessions": sessions, "steps": steps, "mb": mb, "mb_s": mb / seconds}


def run(name: str, steps: list[int], rounds: int, workdir: Path) -> dict:
    model = build_model(name)
    stores = {mode: workdir / name / mode for mode in MODES}
    engines = {
        "off": Engine(model, device="cpu"),
        "on": Engine(model, device="cpu", checkpoint_dir=stores["on"]),
        "sync": Engine(model, device="cpu", checkpoint_dir=stores["sync"], checkpoint=CheckpointPolicy(sync=True)),
    }
    sessions = {mode: engine.create() for mode, engine in engines.items()}
    latency, restore, disk = [], [], []
    n = 0

    def advance(to: int, modes=MODES) -> None:
        nonlocal n
        for k in range(n + 1, to + 1):
            for mode in modes:
                step(engines[mode], sessions[mode], k)
        n = to

    timed_at = [s for s in steps if s <= 500]
    for milestone in sorted(set(steps)):
        advance(milestone, MODES if milestone <= max(timed_at, default=0) else ("off", "on"))
        if milestone in timed_at:
            latency.append(time_steps(engines, sessions, n, rounds))
            n += rounds
        engines["on"].flush()
        on = engines["on"].sessions.get(sessions["on"])
        restored, length = restore_s(model, stores["on"], sessions["on"], reps=3)
        assert length == on.state.length
        restore.append({
            "steps": n, "tokens": on.state.length, "restore_s": restored, "reprefill_s": reprefill_s(engines["off"], sessions["off"], n),
        })
        disk.append({"steps": n, "state_mb": on.state.nbytes / 2**20, "disk_mb": dir_bytes(stores["on"]) / 2**20})
        print(f"{name}: {n} steps: restore {restored * 1e3:.0f} ms, re-prefill {restore[-1]['reprefill_s']:.1f} s", flush=True)
    stats = engines["on"].sessions.writer.stats
    state_growth = engines["on"].state_of(sessions["on"]).nbytes / n
    return {
        "config": name,
        "latency": latency,
        "restore": restore,
        "disk": disk,
        "writer": {
            "bytes_per_step": stats.bytes / n,
            "state_growth_per_step": state_growth,
            "records": stats.records, "snapshots": stats.snapshots, "syncs": stats.syncs,
            "mb_s": stats.bytes / 2**20 / stats.busy_s,
        },
        "saturated": saturated(model, workdir / name / "saturated"),
        "dd_mb_s": dd_write_mb_s(stores["on"]),
    }


def time_steps(engines: dict, sessions: dict, n: int, rounds: int) -> dict:
    """``rounds`` steps on every engine, interleaved and rotating who goes first."""
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        order = MODES[r % 3 :] + MODES[: r % 3]
        for mode in order:
            times[mode].append(step(engines[mode], sessions[mode], n + r + 1))
    ms = {mode: statistics.median(wall for wall, _ in ts) * 1e3 for mode, ts in times.items()}
    cpu = {mode: statistics.median(c for _, c in ts) * 1e3 for mode, ts in times.items()}
    row = {"steps": n, "ms": ms, "cpu_ms": cpu, "overhead_on": ms["on"] / ms["off"] - 1,
           "overhead_sync": ms["sync"] / ms["off"] - 1, "cpu_overhead_on": cpu["on"] / cpu["off"] - 1}
    print(f"  step at {n}: off {ms['off']:.1f} ms, on {ms['on']:.1f} ms ({row['overhead_on']:+.1%}), "
          f"sync {ms['sync']:.1f} ms ({row['overhead_sync']:+.1%}); request-path CPU off {cpu['off']:.1f} ms, "
          f"on {cpu['on']:.1f} ms ({row['cpu_overhead_on']:+.1%})", flush=True)
    return row


# ------------------------------------------------------------------------------ report
def tables(results: list[dict]) -> str:
    out = ["| config | history steps | off ms | on ms | on overhead | sync ms | sync overhead | CPU off ms | CPU on ms | CPU overhead |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["latency"]:
            ms, cpu = row["ms"], row["cpu_ms"]
            out.append(f"| {r['config']} | {row['steps']} | {ms['off']:.1f} | {ms['on']:.1f} | {row['overhead_on']:+.1%} "
                       f"| {ms['sync']:.1f} | {row['overhead_sync']:+.1%} | {cpu['off']:.1f} | {cpu['on']:.1f} | {row['cpu_overhead_on']:+.1%} |")
    out += ["", "| config | history steps | tokens | restore ms | re-prefill s | re-prefill / restore | state MB | disk MB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row, d in zip(r["restore"], r["disk"]):
            out.append(f"| {r['config']} | {row['steps']} | {row['tokens']} | {row['restore_s'] * 1e3:.0f} | "
                       f"{row['reprefill_s']:.1f} | {row['reprefill_s'] / row['restore_s']:.0f}x | {d['state_mb']:.1f} | {d['disk_mb']:.1f} |")
    out += ["", "| config | written KB/step | state growth KB/step | written / growth | records | snapshots | "
            "writer MB/s (episode) | writer MB/s (backlog) | dd MB/s | backlog / dd |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        w, full = r["writer"], r["saturated"]["mb_s"]
        out.append(f"| {r['config']} | {w['bytes_per_step'] / 1024:.0f} | {w['state_growth_per_step'] / 1024:.0f} | "
                   f"{w['bytes_per_step'] / w['state_growth_per_step']:.1f}x | {w['records']} | {w['snapshots']} | "
                   f"{w['mb_s']:.0f} | {full:.0f} | {r['dd_mb_s']:.0f} | {full / r['dd_mb_s']:.2f} |")
    return "\n".join(out)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        steps = [row["steps"] for row in r["restore"]]
        axes[0].plot(steps, [row["restore_s"] for row in r["restore"]], marker="o", label=f"{r['config']}: restore")
        axes[0].plot(steps, [row["reprefill_s"] for row in r["restore"]], marker="s", ls="--", label=f"{r['config']}: re-prefill")
        axes[1].plot(steps, [d["disk_mb"] for d in r["disk"]], marker="o", label=f"{r['config']}: log on disk")
        axes[1].plot(steps, [d["state_mb"] for d in r["disk"]], marker="s", ls="--", label=f"{r['config']}: live state")
    axes[0].set(xscale="log", yscale="log", xlabel="history (steps)", ylabel="seconds", title="taking a session over")
    axes[1].set(xscale="log", yscale="log", xlabel="history (steps)", ylabel="MB", title="disk with compaction")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["default", "jamba256"], choices=list(LLM_CONFIGS))
    p.add_argument("--steps", nargs="+", type=int, default=[10, 100, 500, 1000])
    p.add_argument("--rounds", type=int, default=15, help="interleaved timed steps per history length")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="where the stores go (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/checkpoint.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    results = [run(name, args.steps, args.rounds, workdir) for name in args.configs]
    print(tables(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
