"""Rollout throughput of the longllava/ tasks, and where a step's time goes.

    python -m bench.rollout_envs [--steps 1000] [--tasks RecallCode NeedleFrame]

Two tables, in Markdown:
1. Per task, one unwrapped env in this process: milliseconds to draw a screen (Pillow;
   one per step) and everything else per step (drawing the episode's plan at reset,
   parsing and judging actions, copying observations), and the steps per second.
2. Env steps per second of `envs.rollout.run_rollout` with the random policy on 1 env
   (synchronous) and 4 and 8 envs (asynchronous, one process each), and on 4 envs while
   recording trajectories (PNG screenshots plus JSON lines).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict

import gymnasium as gym

import envs
import envs.base
from envs.render import render
from envs.rollout import run_rollout

clock: dict[str, float] = defaultdict(float)


def timed_render(*args):
    tick = time.perf_counter()
    frame = render(*args)
    clock["render_s"] += time.perf_counter() - tick
    clock["screens"] += 1
    return frame


envs.base.render = timed_render  # every screen an env draws is timed


def breakdown(env_id: str, steps: int) -> dict[str, float]:
    """Where one env's time goes, in milliseconds."""
    env = gym.make(env_id).unwrapped
    env.action_space.seed(0)
    clock.clear()
    done, seed, reset_s, step_s = True, 0, 0.0, 0.0
    for _ in range(steps):
        if done:
            tick = time.perf_counter()
            env.reset(seed=seed)
            reset_s += time.perf_counter() - tick
            seed += 1
        action = env.action_space.sample()
        tick = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(action)
        step_s += time.perf_counter() - tick
        done = terminated or truncated
    other_s = reset_s + step_s - clock["render_s"]
    return {
        "length": env.memory_span + 1,
        "render": 1000 * clock["render_s"] / clock["screens"],
        "other": 1000 * other_s / steps,
        "steps_per_s": steps / (reset_s + step_s),
    }


def throughput(env_id: str, steps: int, num_envs: int, record: bool = False) -> float:
    length = gym.make(env_id).unwrapped.memory_span + 1
    episodes = max(2 * num_envs, steps // length)
    with tempfile.TemporaryDirectory() as out:
        result = run_rollout(env_id, "random", episodes=episodes, num_envs=num_envs, out=out if record else None)
    return result.steps_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="env steps per measurement")
    parser.add_argument("--tasks", nargs="*", default=list(envs.TASKS))
    args = parser.parse_args()
    ids = [f"longllava/{task}-v0" for task in args.tasks]

    print("One env in this process (336x336 screens, default settings)\n")
    print("| task | episode length | render ms/screen | everything else ms/step | steps/s |")
    print("|---|---:|---:|---:|---:|")
    for env_id in ids:
        b = breakdown(env_id, args.steps)
        print(f"| {env_id} | {b['length']} | {b['render']:.3f} | {b['other']:.3f} | {b['steps_per_s']:,.0f} |")

    print("\nEnv steps per second, random policy, through envs.rollout\n")
    print("| task | 1 env (sync) | 4 envs (async) | 8 envs (async) | 4 envs (async) + recording |")
    print("|---|---:|---:|---:|---:|")
    for env_id in ids:
        cells = [throughput(env_id, args.steps, k) for k in (1, 4, 8)] + [throughput(env_id, args.steps, 4, record=True)]
        print(f"| {env_id} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
