"""The agent as a rollout policy: `python -m envs.rollout --agent model`.

    python -m envs.rollout --env longllava/RecallCode-v0 --agent model \\
        [--agent-arg model=PATH] [--agent-arg max_new_tokens=16] [--agent-arg device=cuda]
    python -m envs.rollout --env longllava/RecallCode-v0 --agent model \\
        --agent-arg url=http://127.0.0.1:8000 [--agent-arg api_key=KEY]

Without `model` the embedded default model runs (`model/weights/default`, trained on these
tasks by `training.pipeline`); a reply that holds no action falls back to `wait()`. All policies of a process share one Engine per
(model, device); each policy holds its own session, started afresh at every episode.
With `url` the sessions live on a LongLLaVA server instead (`agent.RemoteBackend`), and
this process loads no model and no torch.

agent/ must not import envs (envs.rollout imports agent), so `act` returns a
`ModelDecision`, which has the fields of `envs.policies.Decision`, rather than that class.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from serving.types import SamplingParams

from .actions import GRAMMAR_HELP
from .agent import Agent
from .backend import Backend, LocalBackend
from .prompt import Observation
from .remote import RemoteBackend


@functools.cache
def shared_engine(model: str | None, device: str | None):
    """One engine per checkpoint and device in this process (None: the embedded default model)."""
    from serving.engine import Engine  # only for a local model: a remote policy needs no torch

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
        url: str | None = None,
        api_key: str | None = None,
        max_new_tokens: int = 256,  # a rationale and its action: ClickTarget hard reads out 12 buttons first
        temperature: float = 0.0,
        top_p: float = 1.0,
    ):
        if url is not None and (model is not None or device is not None):
            raise ValueError("a remote policy (url) runs the server's model: give url, or model and device, not both")
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        backend: Backend = RemoteBackend(url, api_key=api_key) if url else LocalBackend(shared_engine(model, device))
        self.agent = Agent(backend, self.sampling)

    def reset(self, seed: int | None = None) -> None:
        self.agent.sampling = self.sampling.model_copy(update={"seed": seed})
        self.agent.reset(GRAMMAR_HELP)

    def act(self, observation: dict[str, Any], info: dict[str, Any]) -> ModelDecision:
        action = self.agent.step(Observation(observation["screenshot"], observation["instruction"]))
        record = self.agent.records[-1]
        return ModelDecision(action.to_text(), record.parsed.raw, dict(record.timings))
