"""Run a policy on vectorised environments, report how it did, record trajectories.

    python -m envs.rollout --env longllava/RecallCode-v0 --agent oracle \\
        --episodes 20 --num-envs 4 --seed 0 --out runs/recall-oracle \\
        [--env-arg memory_span=100 --env-arg difficulty=hard] [--agent-arg KEY=VALUE]

It prints the success rate, the mean return and length, and env steps per second.
With --out, each episode is written as a trajectory (`envs.trajectory`).

Episode e (counted from 0) is reset with seed S + e, and its policy with a seed drawn
from (S, e), whichever sub-environment runs it: the same --seed gives the same episodes
for any --num-envs. When fewer episodes remain than sub-environments, the idle ones run
spare episodes that are neither counted nor recorded.

--agent picks a policy from `envs.policies.POLICIES`; "model" loads the agent's policy
from agent/ and is the only path by which envs imports it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from tqdm import tqdm

import envs  # noqa: F401  (registers the environments)
from envs.policies import POLICIES, Policy, PolicyFactory, load_policy
from envs.trajectory import TrajectoryWriter


@dataclass(frozen=True)
class EpisodeResult:
    episode: int
    seed: int
    length: int
    episode_return: float
    success: bool
    truncated: bool


@dataclass
class RolloutResult:
    env_id: str
    policy: str
    episodes: list[EpisodeResult] = field(default_factory=list)
    steps: int = 0  # env steps over all sub-environments, spare episodes included
    wall_s: float = 0.0  # time spent stepping, without starting the environments

    @property
    def success_rate(self) -> float:
        return float(np.mean([e.success for e in self.episodes]))

    @property
    def mean_return(self) -> float:
        return float(np.mean([e.episode_return for e in self.episodes]))

    @property
    def mean_length(self) -> float:
        return float(np.mean([e.length for e in self.episodes]))

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_s if self.wall_s else 0.0

    def summary(self) -> str:
        return (
            f"{self.env_id}  agent={self.policy}  episodes={len(self.episodes)}\n"
            f"success rate {self.success_rate:.1%}  mean return {self.mean_return:+.3f}  "
            f"mean length {self.mean_length:.1f}  steps/s {self.steps_per_s:.0f}"
        )


@dataclass
class _Running:
    """The episode a sub-environment is playing."""

    episode: int
    seed: int
    writer: TrajectoryWriter | None = None
    episode_return: float = 0.0
    length: int = 0


def run_rollout(
    env_id: str,
    policy: str | PolicyFactory = "random",
    episodes: int = 10,
    num_envs: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
    env_kwargs: dict[str, Any] | None = None,
    agent_args: dict[str, Any] | None = None,
    vectorization: str | None = None,
    progress: bool = False,
) -> RolloutResult:
    """Plays `episodes` episodes of `env_id` on `num_envs` sub-environments ("async"
    ones by default when there are several) and returns how they went."""
    if episodes < 1 or num_envs < 1:
        raise ValueError(f"need at least one episode and one env, got {episodes} and {num_envs}")
    env_kwargs, agent_args = env_kwargs or {}, agent_args or {}
    factory = load_policy(policy) if isinstance(policy, str) else policy
    policy_name = policy if isinstance(policy, str) else getattr(policy, "__name__", repr(policy))
    vectorization = vectorization or ("async" if num_envs > 1 else "sync")
    vector_kwargs: dict[str, Any] = {"autoreset_mode": AutoresetMode.DISABLED}
    if vectorization == "async":
        vector_kwargs["shared_memory"] = False  # text spaces cannot live in shared memory
    vector_env = gym.make_vec(env_id, num_envs, vectorization_mode=vectorization, vector_kwargs=vector_kwargs, **env_kwargs)
    policies: list[Policy] = []
    running: list[_Running] = []
    result = RolloutResult(env_id, policy_name)
    episode_count = 0

    def start(i: int) -> _Running:
        """Picks the next episode for sub-environment i and resets its policy."""
        nonlocal episode_count
        episode, episode_count = episode_count, episode_count + 1
        policies[i].reset(seed=int(np.random.SeedSequence((seed, episode)).generate_state(1)[0]))
        return _Running(episode, seed + episode)

    def record(r: _Running, reset_info: dict[str, Any]) -> None:
        """Opens the episode's trajectory, if it is to be recorded."""
        if out is not None and r.episode < episodes:
            meta = dict(episode=r.episode, seed=r.seed, env_id=env_id, env_kwargs=env_kwargs,
                        policy=policy_name, reset_info=reset_info)
            r.writer = TrajectoryWriter(Path(out) / f"episode_{r.episode:06d}", meta)

    # env steps, not episodes: one long episode would otherwise sit at 0/1 until it ends
    bar = tqdm(unit="step", disable=not progress, file=sys.stderr)
    try:
        policies += [factory(env_id=env_id, action_space=vector_env.single_action_space, **agent_args) for _ in range(num_envs)]
        running += [start(i) for i in range(num_envs)]
        batch, batch_info = vector_env.reset(seed=[r.seed for r in running])
        observations = [_unbatch(batch, i) for i in range(num_envs)]
        infos = [_unbatch(batch_info, i) for i in range(num_envs)]
        for r, info in zip(running, infos):
            record(r, info)
        began = time.perf_counter()
        while len(result.episodes) < episodes:
            decisions, act_s = [], []
            for policy_i, observation, info in zip(policies, observations, infos):
                tick = time.perf_counter()
                decisions.append(policy_i.act(observation, info))
                act_s.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            batch, rewards, terminations, truncations, batch_info = vector_env.step(tuple(d.action for d in decisions))
            env_step_s = time.perf_counter() - tick
            result.steps += num_envs
            bar.update(num_envs)
            finished = np.zeros(num_envs, dtype=bool)
            for i, (r, decision) in enumerate(zip(running, decisions)):
                info = _unbatch(batch_info, i)
                reward, terminated, truncated = float(rewards[i]), bool(terminations[i]), bool(truncations[i])
                r.episode_return += reward
                r.length += 1
                if r.writer is not None:
                    timings = {"act_s": act_s[i], "env_step_s": env_step_s, **decision.timings}
                    r.writer.add(observations[i], decision.action, reward, terminated, truncated, info,
                                 decision.model_output, timings)
                observations[i], infos[i] = _unbatch(batch, i), info
                if terminated or truncated:
                    finished[i] = True
                    success = bool(info.get("is_success", False))
                    if r.writer is not None:
                        r.writer.finish(length=r.length, episode_return=r.episode_return, success=success, truncated=truncated)
                    if r.episode < episodes:
                        result.episodes.append(EpisodeResult(r.episode, r.seed, r.length, r.episode_return, success, truncated))
            if finished.any() and len(result.episodes) < episodes:
                for i in np.flatnonzero(finished):
                    running[i] = start(i)
                seeds = [r.seed if done else None for r, done in zip(running, finished)]
                batch, batch_info = vector_env.reset(seed=seeds, options={"reset_mask": finished})
                for i in np.flatnonzero(finished):
                    observations[i], infos[i] = _unbatch(batch, i), _unbatch(batch_info, i)
                    record(running[i], infos[i])
            result.wall_s = time.perf_counter() - began
            bar.set_postfix(episodes=f"{len(result.episodes)}/{episodes}", refresh=False)
    finally:
        bar.close()
        for r in running:
            if r.writer is not None:
                r.writer.close()
        vector_env.close()
    result.episodes.sort(key=lambda e: e.episode)
    return result


def _unbatch(batch: dict[str, Any], i: int) -> dict[str, Any]:
    """Sub-environment i's share of a vector env's observation or info dict. An info
    key k comes with a mask "_k" saying which sub-environments set it."""
    single = {}
    for key, value in batch.items():
        if key.startswith("_"):
            continue
        if f"_{key}" in batch and not batch[f"_{key}"][i]:
            continue
        single[key] = _unbatch(value, i) if isinstance(value, dict) else value[i]
    return single


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    env_kwargs, agent_args = dict(args.env_arg), dict(args.agent_arg)
    _check(parser, args.env, env_kwargs, args.agent, agent_args)
    try:
        result = run_rollout(
            args.env, args.agent, args.episodes, args.num_envs, args.seed, args.out,
            env_kwargs, agent_args, args.vectorization, progress=True,
        )
    except KeyboardInterrupt:
        print("interrupted; unfinished trajectories are marked incomplete", file=sys.stderr)
        return 130
    print(result.summary())
    if args.out is not None:
        print(f"trajectories in {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m envs.rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", required=True, help="a registered id, e.g. longllava/RecallCode-v0")
    parser.add_argument("--agent", default="random", choices=sorted(POLICIES))
    parser.add_argument("--episodes", type=_positive_int, default=10)
    parser.add_argument("--num-envs", type=_positive_int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="record trajectories under this directory")
    parser.add_argument("--vectorization", choices=("sync", "async"), help="default: async for several envs")
    parser.add_argument("--env-arg", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                        help="env constructor argument")
    parser.add_argument("--agent-arg", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                        help="policy factory argument")
    return parser


def _key_value(pair: str) -> tuple[str, Any]:
    """ "memory_span=100" -> ("memory_span", 100): a value is read as JSON when it can be,
    else kept as a string."""
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {pair!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _check(parser: argparse.ArgumentParser, env_id: str, env_kwargs: dict, agent: str, agent_args: dict) -> None:
    """Fail early, with the reason, before any vector env or model starts: the env id and
    its arguments (one env is made and closed), and the policy and its arguments."""
    try:
        gym.make(env_id, **env_kwargs).close()
    except gym.error.Error as error:
        parser.error(f"--env {env_id}: {error}")
    except (TypeError, ValueError) as error:
        parser.error(f"--env-arg: {error}")
    try:
        factory = load_policy(agent)
    except (ImportError, AttributeError) as error:
        parser.error(str(error))
    try:
        inspect.signature(factory).bind(env_id=env_id, action_space=None, **agent_args)
    except TypeError as error:
        parser.error(f"--agent-arg for --agent {agent}: {error}")


if __name__ == "__main__":
    sys.exit(main())
