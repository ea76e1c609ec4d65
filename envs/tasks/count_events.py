"""CountEvents: count on how many screens an icon appeared, asked only at the end.

Each of the `memory_span` watch screens shows a few icons; the target (a coloured shape)
is among them on `count` screens, with `count` uniform in 0..max_count. The question
names the target only at the end, so every screen must be remembered, not just a
running tally. Distractors never match the target; on "easy" they share neither its
shape nor its colour, otherwise they may share one. The right action is
`answer("<count>")`; the random baseline answers uniformly, so its chance is
1 / (max_count + 1).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from envs.actions import Answer
from envs.base import Episode, ScreenEnv, one, pick
from envs.render import PALETTE, SHAPES, Icon, Label, Screen, grid
from envs.spaces import Sampler, uniform_answer

MAX_COUNT = {"easy": 3, "medium": 5, "hard": 8}
DISTRACTORS = {"easy": 2, "medium": 3, "hard": 5}  # icons per screen besides the target
ICON_RADIUS = 90


class CountEventsEnv(ScreenEnv):
    default_memory_span = 12

    @property
    def max_count(self) -> int:
        return min(self.memory_span, MAX_COUNT[self.difficulty])

    def _make_episode(self, rng: np.random.Generator) -> Episode:
        shape, color = one(rng, SHAPES), one(rng, list(PALETTE))
        if self.difficulty == "easy":
            lookalikes = [(s, c) for s in SHAPES for c in PALETTE if s != shape and c != color]
        else:
            lookalikes = [(s, c) for s in SHAPES for c in PALETTE if (s, c) != (shape, color)]
        count = int(rng.integers(0, self.max_count + 1))
        with_target = set(pick(rng, range(self.memory_span), count))
        watching = [
            self._icons(rng, pick(rng, lookalikes, DISTRACTORS[self.difficulty]) + [(shape, color)] * (t in with_target))
            for t in range(self.memory_span)
        ]
        question = Screen(
            "Quiz",
            f'How many screens showed the {color} {shape}? Reply answer("N") with N from 0 to {self.max_count}.',
            (Label((100, 250), "How many screens showed this?", 60), Icon(shape, (500, 600), 150, PALETTE[color])),
        )
        return Episode((*watching, question), Answer(str(count)))

    @staticmethod
    def _icons(rng: np.random.Generator, kinds: list[tuple[str, str]]) -> Screen:
        cells = pick(rng, grid(3, 4), len(kinds))
        icons = tuple(
            Icon(shape, ((x0 + x1) // 2, (y0 + y1) // 2), ICON_RADIUS, PALETTE[color])
            for (shape, color), (x0, y0, x1, y1) in zip(kinds, cells)
        )
        return Screen("Monitor", "Watch the icons; you will be asked about them. Reply wait() to continue.", icons)

    def _sampler(self) -> Sampler:
        return partial(uniform_answer, choices=tuple(str(n) for n in range(self.max_count + 1)))

    @property
    def chance(self) -> float:
        return 1 / (self.max_count + 1)
