"""Policies: what picks the actions of one environment, and how rollouts find them.

A policy drives one environment; a rollout over K environments makes K policies.

    class Policy(Protocol):
        def reset(self, seed: int | None = None) -> None   # a new episode starts
        def act(self, observation: dict, info: dict) -> Decision

`act` gets the observation and the env's info for the same step. A model policy must
read the observation only: info holds privileged state for baselines and evaluation
(`info["solution"]` on the longllava/ tasks, `info["dom"]` on MiniWoB).
A `Decision` is the action text plus what the trajectory should keep about how it was
chosen: the model's raw output and timings in seconds by phase.

`POLICIES` names each policy's factory as "module:attribute", imported only when that
policy is chosen. A factory is called as

    factory(env_id=..., action_space=..., **agent_args) -> Policy

where `agent_args` are the strings given as `--agent-arg KEY=VALUE` on the rollout
command line. A policy class whose constructor takes those arguments is its own factory.

The model policy lives in agent/, which envs never imports otherwise: `--agent model`
loads `agent.policy:ModelPolicy`, a factory as above taking `--agent-arg model=PATH`,
`device=...`, `max_new_tokens=...`, `temperature=...` and `top_p=...`.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym

from envs.base import expert_reply


@dataclass
class Decision:
    action: str
    model_output: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Policy(Protocol):
    def reset(self, seed: int | None = None) -> None: ...

    def act(self, observation: dict[str, Any], info: dict[str, Any]) -> Decision: ...


class PolicyFactory(Protocol):
    def __call__(self, *, env_id: str, action_space: gym.Space, **agent_args: str) -> Policy: ...


POLICIES = {
    "random": "envs.policies:RandomPolicy",
    "oracle": "envs.policies:OraclePolicy",
    "scripted": "envs.miniwob_scripted:ScriptedPolicy",
    "model": "agent.policy:ModelPolicy",
}


class RandomPolicy:
    """Samples the env's action space: on every task that is a well-formed guess of
    the task's answer kind (see `envs.spaces.ActionText`), so it scores at chance."""

    def __init__(self, *, env_id: str, action_space: gym.Space):
        self.action_space = copy.deepcopy(action_space)

    def reset(self, seed: int | None = None) -> None:
        self.action_space.seed(seed)

    def act(self, observation: dict[str, Any], info: dict[str, Any]) -> Decision:
        return Decision(self.action_space.sample())


class OraclePolicy:
    """Plays `info["solution"]`, which a longllava/ task computes from its hidden state; where
    the task gives `info["rationale"]`, its output writes that first (`envs.base.expert_reply`)."""

    def __init__(self, *, env_id: str, action_space: gym.Space):
        self.env_id = env_id

    def reset(self, seed: int | None = None) -> None:
        pass

    def act(self, observation: dict[str, Any], info: dict[str, Any]) -> Decision:
        if "solution" not in info:
            raise ValueError(f"{self.env_id} gives no info['solution']; the oracle plays longllava/ tasks only")
        solution = str(info["solution"])
        return Decision(solution, expert_reply(solution, info["rationale"]) if "rationale" in info else None)


def load_policy(name: str) -> PolicyFactory:
    """The factory registered as `name` in `POLICIES`, imported now."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    module_name, attribute = POLICIES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if not (module_name == missing or module_name.startswith(missing + ".")):
            raise  # the module exists, but something it imports is missing
        raise ModuleNotFoundError(
            f"policy {name!r} needs the module {module_name!r}, which does not exist yet: "
            f"write {attribute} there (see envs/policies.py for the interface)"
        ) from error
    if not hasattr(module, attribute):
        raise AttributeError(f"policy {name!r} needs {module_name}.{attribute} (see envs/policies.py for the interface)")
    return getattr(module, attribute)
