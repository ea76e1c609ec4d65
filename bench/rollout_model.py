"""Rollout throughput with the model policy, and where an env step's time goes.

    python -m bench.rollout_model [--steps 40] [--envs 1 4 8] [--max-new-tokens 8] [--threads 1]

For each number of envs K, `envs.rollout.run_rollout` plays K episodes of
longllava/RecallCode-v0 on K envs (synchronous for 1, asynchronous processes for more),
each episode `--steps` long (memory_span = steps - 1), recording trajectories, once with
the random policy and once with `agent.policy.ModelPolicy` on the embedded default model.
The time split comes from the recorded timings: the vector env's step (render and scoring;
shared by the K envs it steps), the model append, the model generate, parsing, and the
rest (the random policy's sampling, recording PNGs and JSON lines, bookkeeping).

Policies act one after another in the rollout loop and each model step is one session's
append and decode, so the model's steps/s does not grow with K until the engine batches
decodes across sessions.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from agent.policy import ModelPolicy
from envs.rollout import run_rollout
from envs.trajectory import read_trajectories

ENV_ID = "longllava/RecallCode-v0"
PHASES = ("model_append_s", "model_generate_s", "parse_s")


def measure(policy, num_envs: int, steps: int) -> dict[str, float]:
    """Steps per second and milliseconds per env step by phase."""
    with tempfile.TemporaryDirectory() as out:
        result = run_rollout(ENV_ID, policy, episodes=num_envs, num_envs=num_envs, out=out,
                             env_kwargs={"memory_span": steps - 1})
        rows = [step["timings"] for trajectory in read_trajectories(Path(out)) for step in trajectory.steps]
    assert len(rows) == result.steps == num_envs * steps
    per_step = {"env_step": sum(r["env_step_s"] for r in rows) / num_envs}  # one vector step times K env steps
    per_step |= {phase: sum(r.get(phase, 0.0) for r in rows) for phase in PHASES}
    per_step["other"] = result.wall_s - sum(per_step.values())
    return {"steps_per_s": result.steps_per_s} | {k: 1000 * v / result.steps for k, v in per_step.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="env steps per env (one episode each)")
    parser.add_argument("--envs", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a shared machine more threads than free cores slow it down)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def model_policy(**kwargs):
        return ModelPolicy(max_new_tokens=args.max_new_tokens, **kwargs)

    print(f"{ENV_ID}, {args.steps}-step episodes (336x336), max_new_tokens={args.max_new_tokens}, "
          f"torch threads={args.threads}, embedded default model on the CPU\n")
    print("| policy | envs | steps/s | env step ms | model append ms | model generate ms | parse ms | other ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, policy in (("random", "random"), ("model", model_policy)):
        measure(policy, 1, 2)  # untimed: loads the model and warms up the first calls
        for k in args.envs:
            m = measure(policy, k, args.steps)
            cells = [f"{m['steps_per_s']:,.1f}"] + [f"{m[key]:.2f}" for key in ("env_step", *PHASES, "other")]
            print(f"| {name} | {k} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
