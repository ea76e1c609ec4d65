"""The Agent API: `Agent.step(observation) -> Action` over a session that a backend keeps.

    from agent import Agent, LocalBackend, Observation
    from serving.engine import Engine

    agent = Agent(LocalBackend(Engine()))
    agent.reset("Sign in with the code you are shown.")
    action = agent.step(Observation(screenshot, "Reply wait() to continue."))  # e.g. Click(x=500, y=300)

Modules: `actions` (typed actions, the text grammar, lenient parsing), `prompt` (a step
as LongLLaVA prompt pieces), `backend` (the session protocol and `LocalBackend`), `remote`
(`RemoteBackend`, the same protocol over HTTP to the Ray Serve app: no torch), `agent`
(the Agent), `policy` (the agent as an `envs.rollout` policy, `--agent model`).
"""

from .actions import (
    ACTION,
    FALLBACK,
    Action,
    Answer,
    Click,
    Key,
    ParsedAction,
    Scroll,
    TypeText,
    Wait,
    format_action,
    parse_action,
)
from .agent import Agent, NoSessionError, StepRecord
from .backend import Backend, Generation, LocalBackend
from .prompt import Observation, step_pieces
from .remote import RemoteBackend

__all__ = [
    "ACTION", "FALLBACK", "Action", "Agent", "Answer", "Backend", "Click", "Generation", "Key",
    "LocalBackend", "NoSessionError", "Observation", "ParsedAction", "RemoteBackend", "Scroll", "StepRecord", "TypeText",
    "Wait", "format_action", "parse_action", "step_pieces",
]
