"""Text spaces for free-form strings.

Gymnasium's `Text` admits only its charset ([a-zA-Z0-9] by default), but instructions
and actions are free-form: quotes, parentheses, any language. `Unicode` admits every
string within its length bounds, as the miniwob and BrowserGym packages' spaces do.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium.spaces import Text

from envs.actions import COORDINATE_MAX, Action, Answer, Click, format_action

MAX_TEXT_LENGTH = 4096

Sampler = Callable[[np.random.Generator], Action]
"""Draws one well-formed action; must be picklable (a module-level function or a
`functools.partial` of one), since vector environments send spaces between processes."""


class Unicode(Text):
    """Any `str` of `min_length..max_length` characters. `sample` draws from
    printable ASCII, since a space has to sample from somewhere."""

    def __init__(self, max_length: int = MAX_TEXT_LENGTH, min_length: int = 0, seed: int | None = None):
        super().__init__(max_length, min_length=min_length, charset=string.printable, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    @property
    def is_np_flattenable(self) -> bool:
        return False  # Text flattens through charset indices, which a free-form string lacks

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Unicode)
            and self.min_length == other.min_length
            and self.max_length == other.max_length
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.min_length}, {self.max_length})"


class ActionText(Unicode):
    """The action space: any string is a member, since a malformed action is a wrong
    action rather than an invalid one. `sample` draws a well-formed action from the
    task's `sampler`, so `env.action_space.sample()` is the task's random baseline.

    Equality ignores the sampler, which does not change what belongs to the space. It
    also could not be compared: an AsyncVectorEnv checks each worker's space against its
    own, and the worker's sampler arrives as a copy."""

    def __init__(self, sampler: Sampler, max_length: int = MAX_TEXT_LENGTH, seed: int | None = None):
        super().__init__(max_length, seed=seed)
        self.sampler = sampler

    def sample(self, mask: None = None, probability: None = None) -> str:
        if mask is not None or probability is not None:
            raise ValueError("ActionText samples from its task's sampler; it takes no mask")
        return format_action(self.sampler(self.np_random))


def uniform_click(rng: np.random.Generator) -> Click:
    """A click anywhere on the screen."""
    return Click(int(rng.integers(0, COORDINATE_MAX + 1)), int(rng.integers(0, COORDINATE_MAX + 1)))


def uniform_answer(rng: np.random.Generator, choices: tuple[str, ...]) -> Answer:
    """One of a question's `choices`, as `functools.partial(uniform_answer, choices=...)`."""
    return Answer(choices[int(rng.integers(len(choices)))])
