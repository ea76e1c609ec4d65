"""NeedleFrame: a needle frame hidden among up to 1000 video frames (V-NIAH style).

The watch screens are frames of a synthetic video: sky, ground and scattered shapes.
One frame, at a random depth, also carries a caption "The secret word is <word>"; it is
smaller and placed anywhere on harder levels. After the video a question offers four
words as A-D; the right action is the letter of the secret word, so the random
baseline's chance is 1/4.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np

from envs.actions import Answer
from envs.base import Episode, ScreenEnv, one, pick
from envs.render import BLACK, GREY, PALETTE, SHAPES, WHITE, Icon, Label, Panel, Screen, grid, inset
from envs.spaces import Sampler, uniform_answer
from envs.tasks.words import NOUNS

CHOICES = ("A", "B", "C", "D")
# difficulty -> (caption size in 0..1000 units, shapes per frame)
CAPTION = {"easy": ((800, 220), 3), "medium": ((560, 140), 5), "hard": ((400, 90), 8)}
SKIES = ((135, 190, 235), (250, 190, 140), (60, 70, 110), (200, 210, 220))
GROUNDS = ((90, 150, 70), (200, 170, 110), (70, 90, 80))
HORIZON = 620
WATCH = "Watch the video; you will be asked about it. Reply wait() to continue."


class NeedleFrameEnv(ScreenEnv):
    default_memory_span = 64

    def _make_episode(self, rng: np.random.Generator) -> Episode:
        word, *others = pick(rng, NOUNS, len(CHOICES))
        depth = int(rng.integers(self.memory_span))
        frames = [self._video_frame(rng) for _ in range(self.memory_span)]
        frames[depth] = self._with_caption(frames[depth], f"The secret word is {word}", rng)
        options = pick(rng, [word, *others], len(CHOICES))
        question = Screen(
            "Quiz",
            "One frame of the video showed a secret word. Which was it? "
            + " ".join(f"{letter}) {option}" for letter, option in zip(CHOICES, options))
            + '. Reply answer("A"), answer("B"), answer("C") or answer("D").',
            (
                Label((100, 200), "Which was the secret word?", 60),
                *(Panel(inset(cell, 20, 20), WHITE, f"{letter}) {option}", outline=GREY)
                  for letter, option, cell in zip(CHOICES, options, grid(2, 2, (100, 320, 900, 900)))),
            ),
        )
        return Episode((*frames, question), Answer(CHOICES[options.index(word)]))

    def _video_frame(self, rng: np.random.Generator) -> Screen:
        sky, ground = one(rng, SKIES), one(rng, GROUNDS)
        shapes = [
            Icon(one(rng, SHAPES), (int(rng.integers(80, 920)), int(rng.integers(180, 920))),
                 int(rng.integers(30, 90)), one(rng, list(PALETTE.values())))
            for _ in range(CAPTION[self.difficulty][1])
        ]
        return Screen("Video", WATCH, (Panel((0, HORIZON, 1000, 1000), ground), *shapes), background=sky)

    def _with_caption(self, frame: Screen, text: str, rng: np.random.Generator) -> Screen:
        (width, height), _ = CAPTION[self.difficulty]
        x = int(rng.integers(0, 1000 - width + 1)) if self.difficulty != "easy" else (1000 - width) // 2
        y = int(rng.integers(100, 1000 - height + 1))
        caption = Panel((x, y, x + width, y + height), BLACK, text, WHITE)
        return replace(frame, elements=(*frame.elements, caption))

    def _sampler(self) -> Sampler:
        return partial(uniform_answer, choices=CHOICES)

    @property
    def chance(self) -> float:
        return 1 / len(CHOICES)
