"""OrderEvents: which of two words appeared first?

The watch screens show notification cards with words. Two of the words appear exactly
once each, at two random screens; the others are distractors that never repeat them.
The question shows the two words as A and B in random order; the right action is
`answer("A")` or `answer("B")`, so the random baseline's chance is 1/2.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from envs.actions import Answer
from envs.base import Episode, ScreenEnv, pick
from envs.render import GREY, WHITE, Label, Panel, Screen, grid, inset
from envs.spaces import Sampler, uniform_answer
from envs.tasks.words import NOUNS

CARDS = {"easy": 1, "medium": 2, "hard": 3}  # cards per watch screen
CHOICES = ("A", "B")


class OrderEventsEnv(ScreenEnv):
    default_memory_span = 8
    min_memory_span = 2

    def _make_episode(self, rng: np.random.Generator) -> Episode:
        first, second, *distractors = pick(rng, NOUNS, len(NOUNS))
        when_first, when_second = sorted(pick(rng, range(self.memory_span), 2))
        cards = CARDS[self.difficulty]
        watching = []
        for t in range(self.memory_span):
            words = pick(rng, distractors, cards)
            if t in (when_first, when_second):
                words[int(rng.integers(cards))] = first if t == when_first else second
            watching.append(self._notifications(words))
        a, b = (first, second) if rng.random() < 0.5 else (second, first)
        question = Screen(
            "Quiz",
            f'Which word appeared first: A ("{a}") or B ("{b}")? Reply answer("A") or answer("B").',
            (
                Label((100, 250), "Which appeared first?", 60),
                Panel((100, 400, 450, 600), WHITE, f"A: {a}", outline=GREY),
                Panel((550, 400, 900, 600), WHITE, f"B: {b}", outline=GREY),
            ),
        )
        return Episode((*watching, question), Answer("A" if a == first else "B"))

    @staticmethod
    def _notifications(words: list[str]) -> Screen:
        return Screen(
            "Notifications",
            "Watch the notifications; you will be asked about them. Reply wait() to continue.",
            tuple(Panel(inset(row, 0, 40), WHITE, word, outline=GREY) for row, word in zip(grid(3, 1), words)),
        )

    def _sampler(self) -> Sampler:
        return partial(uniform_answer, choices=CHOICES)

    @property
    def chance(self) -> float:
        return 1 / len(CHOICES)
