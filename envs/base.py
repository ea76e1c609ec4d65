"""The episode loop that every screenshot task shares.

An episode is `memory_span` watch screens followed by one question screen. The
evidence lies somewhere in the watch screens; the question is decided at the last step,
so what was shown up to `memory_span` steps ago decides the right action now.

Scoring, the same for every task:
- a watch step scores 0 for any well-formed action (the agent is expected to
  `wait()`, but acting does no harm: the screens are a recording) and moves on;
- the question step scores +1 for the right action and -1 for a wrong one, and the
  episode terminates; `info["is_success"]` says which;
- a malformed action scores -1 at any step and `info["action_error"]` says why (it is
  "" otherwise); at the question step it is simply a wrong answer.

`info["solution"]` is the right action for the observation it comes with: `wait()`
while watching, the answer at the question. It is ground truth for the oracle baseline
and for evaluation; never show it to a model. A task may also give `info["rationale"]`
at the question: what an expert notes before it acts (ClickTarget: the buttons it sees),
which the oracle writes on a line before its action (`expert_reply`).

A task subclass sets `default_memory_span` and `min_memory_span` and implements
`_make_episode(rng)`, which draws a whole episode up front from the env's seeded generator,
and `_sampler()`, the random baseline's guess (see `envs.spaces.ActionText`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.actions import Action, Answer, Click, TypeText, Wait, format_action, parse_action
from envs.render import Box, Screen, hits, render
from envs.spaces import ActionText, Sampler, Unicode

Difficulty = Literal["easy", "medium", "hard"]
DIFFICULTIES: tuple[Difficulty, ...] = ("easy", "medium", "hard")
MAX_MEMORY_SPAN = 1000

RIGHT, WRONG = 1.0, -1.0
WAIT = format_action(Wait())

T = TypeVar("T")


def expert_reply(action: str, rationale: str = "") -> str:
    """What an expert writes at a step: the rationale, where there is one, on a line before
    the action. An agent's parser reads the first action call in a reply, so the note costs
    nothing to parse, and a model trained on such replies writes its own note first."""
    return f"{rationale}\n{action}" if rationale else action


def pick(rng: np.random.Generator, items: Sequence[T], k: int) -> list[T]:
    """k distinct items in random order (plain Python values, unlike `rng.choice`)."""
    return [items[i] for i in rng.permutation(len(items))[:k]]


def one(rng: np.random.Generator, items: Sequence[T]) -> T:
    """A random item (a plain Python value, unlike `rng.choice`)."""
    return items[int(rng.integers(len(items)))]


@dataclass(frozen=True)
class Episode:
    """A task's episode, decided at reset: the screens in order (the last one asks the
    question) and the right action; a click must land inside `target`."""

    screens: tuple[Screen, ...]
    solution: Answer | TypeText | Click
    target: Box | None = None
    rationale: str = ""  # what an expert notes at the question before it acts (``expert_reply``)

    def reply(self) -> str:
        """The expert's whole reply at the question: its rationale, then the solution."""
        return expert_reply(format_action(self.solution), self.rationale)


class ScreenEnv(gym.Env[dict[str, Any], str]):
    """Observation: {"screenshot": uint8 (height, width, 3), "instruction": str}.
    Action: a string in the action grammar (`envs.actions`).

    `width` and `height` are the screenshot's size in pixels; `memory_span` is the number
    of watch screens before the question (the task's default when None)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}
    default_memory_span = 8
    min_memory_span = 1

    def __init__(
        self,
        width: int = 336,
        height: int = 336,
        difficulty: Difficulty = "medium",
        memory_span: int | None = None,
        render_mode: str | None = None,
    ):
        memory_span = self.default_memory_span if memory_span is None else memory_span
        if width < 32 or height < 32:
            raise ValueError(f"screen must be at least 32x32 pixels, got {width}x{height}")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        if not self.min_memory_span <= memory_span <= MAX_MEMORY_SPAN:
            raise ValueError(
                f"{type(self).__name__} needs {self.min_memory_span} <= memory_span <= {MAX_MEMORY_SPAN}, got {memory_span}"
            )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}")
        self.width, self.height = width, height
        self.difficulty = difficulty
        self.memory_span = memory_span
        self.render_mode = render_mode
        self.observation_space = spaces.Dict(
            {
                "screenshot": spaces.Box(0, 255, (height, width, 3), np.uint8),
                "instruction": Unicode(),
            }
        )
        self.action_space = ActionText(self._sampler())
        self._episode: Episode | None = None
        self._t = 0
        self._frame = np.zeros((height, width, 3), np.uint8)

    # --- what a task provides -------------------------------------------------------

    def _make_episode(self, rng: np.random.Generator) -> Episode:
        raise NotImplementedError

    def _sampler(self) -> Sampler:
        raise NotImplementedError

    @property
    def chance(self) -> float:
        """The success rate of the random baseline (`action_space.sample()`)."""
        raise NotImplementedError

    # --- the Gymnasium API --------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._episode = self._make_episode(self.np_random)
        assert len(self._episode.screens) == self.memory_span + 1
        self._t = 0
        return self._observe(), self._expert()

    def step(self, action: str):
        parsed = parse_action(action)
        error = "" if parsed is not None else f"not an action in the grammar: {str(action)[:200]!r}"
        info: dict[str, Any] = {"action_error": error}
        if self._t < self.memory_span:
            reward, terminated = (0.0 if parsed is not None else WRONG), False
            self._t += 1
            observation = self._observe()
        else:
            success = parsed is not None and self._is_right(parsed)
            reward, terminated = (RIGHT if success else WRONG), True
            info["is_success"] = success
            observation = self._observation()
        return observation, reward, terminated, False, {**info, **self._expert()}

    def render(self) -> np.ndarray | None:
        return self._frame.copy() if self.render_mode == "rgb_array" else None

    # --- helpers ------------------------------------------------------------------------

    def _observe(self) -> dict[str, Any]:
        """Draws the current screen and returns its observation."""
        self._frame = render(self._episode.screens[self._t], self.width, self.height)
        return self._observation()

    def _observation(self) -> dict[str, Any]:
        return {"screenshot": self._frame.copy(), "instruction": self._episode.screens[self._t].instruction}

    def _expert(self) -> dict[str, str]:
        """``info``'s ground truth: the solution, and the rationale at the question."""
        if self._t < self.memory_span:
            return {"solution": WAIT}
        solution = format_action(self._episode.solution)
        return {"solution": solution, **({"rationale": self._episode.rationale} if self._episode.rationale else {})}

    def _is_right(self, action: Action) -> bool:
        solution = self._episode.solution
        if isinstance(solution, Click):
            return isinstance(action, Click) and hits(self._episode.target, action, self.width, self.height)
        return type(action) is type(solution) and action.text.strip().casefold() == solution.text.casefold()
