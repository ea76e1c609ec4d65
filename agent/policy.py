"""The agent as a rollout policy: `python -m envs.rollout --agent model`.

    python -m envs.rollout --env longllava/RecallCode-v0 --agent model \\
        [--agent-arg model=PATH] [--agent-arg max_new_tokens=16] [--agent-arg device=cuda]

Without `model` the embedded default model runs (random weights: its replies are mostly
not actions and fall back to `wait()`). All policies of a process share one Engine per
(model, device); each policy holds its own session, started afresh at every episode.

agent/ must not import envs (envs.rollout imports agent), so `act` returns a
`ModelDecision`, which has the fields of `envs.policies.Decision`, rather than that class.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from serving.engine import Engine
from serving.types import SamplingParams

from .actions import GRAMMAR_HELP
from .agent import Agent
from .backend import LocalBackend
from .prompt import Observation


@functools.cache
def shared_engine(model: str | None, device: str | None) -> Engine:
    """One engine per checkpoint and device in this process (None: the embedded default model)."""
    return Engine.from_pretrained(model, device=device)


@dataclass
class ModelDecision:
    action: str
    model_output: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class ModelPolicy:
    """A policy factory as envs.policies expects. The agent reads the observation only;
    its task instruction is the action grammar, and each screen's text says what to do."""

    def __init__(
        self,
        *,
        env_id: str,
        action_space: Any,
        model: str | None = None,
        device: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ):
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.agent = Agent(LocalBackend(shared_engine(model, device)), self.sampling)

    def reset(self, seed: int | None = None) -> None:
        self.agent.sampling = self.sampling.model_copy(update={"seed": seed})
        self.agent.reset(GRAMMAR_HELP)

    def act(self, observation: dict[str, Any], info: dict[str, Any]) -> ModelDecision:
        action = self.agent.step(Observation(observation["screenshot"], observation["instruction"]))
        record = self.agent.records[-1]
        return ModelDecision(action.to_text(), record.parsed.raw, dict(record.timings))
