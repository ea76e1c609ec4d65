"""RecallCode: an access code is shown once; `memory_span` steps later, type it.

The code appears on the first screen, in a monospace box as one-time-code displays
show it (each character of a code sits at the same place, whatever the code). Inbox
screens of distractor messages follow (on "hard" each inbox also shows a decoy code of
the same form), and the last screen is a sign-in form. The right action is
`type("<code>")`. The random baseline types a random code of the right length, so its
chance is about zero.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from envs.actions import TypeText
from envs.base import Episode, ScreenEnv, one, pick
from envs.render import GREY, PALETTE, WHITE, Label, Panel, Screen, grid, inset
from envs.spaces import Sampler
from envs.tasks.words import NOUNS

ALPHABET = "ACDEFHJKLMNPRTUVWXY34679"  # no look-alikes such as O/0, I/1, S/5, B/8
CODE_LENGTH = {"easy": 4, "medium": 6, "hard": 8}
INBOX_ROWS = 4


def random_code(rng: np.random.Generator, length: int) -> str:
    return "".join(one(rng, ALPHABET) for _ in range(length))


def type_random_code(rng: np.random.Generator, length: int) -> TypeText:
    return TypeText(random_code(rng, length))


class RecallCodeEnv(ScreenEnv):
    default_memory_span = 8

    def _make_episode(self, rng: np.random.Generator) -> Episode:
        length = CODE_LENGTH[self.difficulty]
        code = random_code(rng, length)
        shown = Screen(
            "Sign-in",
            "Remember this access code; you will need it later. Reply wait() to continue.",
            (
                Label((120, 300), "Your one-time access code:", 60),
                Panel((120, 420, 880, 620), WHITE, code, outline=GREY, monospace=True),
            ),
        )
        inboxes = [self._inbox(rng, length) for _ in range(self.memory_span - 1)]
        form = Screen(
            "Sign-in",
            f'Type the {length}-character access code you were shown earlier, as type("...").',
            (
                Label((120, 300), "Enter your access code:", 60),
                Panel((120, 420, 880, 560), WHITE, outline=GREY),
                Panel((600, 640, 880, 760), PALETTE["blue"], "Sign in", WHITE),
            ),
        )
        return Episode((shown, *inboxes, form), TypeText(code))

    def _inbox(self, rng: np.random.Generator, length: int) -> Screen:
        messages = [" ".join(pick(rng, NOUNS, 3)).capitalize() for _ in range(INBOX_ROWS)]
        if self.difficulty == "hard":
            messages[int(rng.integers(INBOX_ROWS))] = f"Order ref {random_code(rng, length)}"
        return Screen(
            "Inbox",
            "Keep the access code in mind. Reply wait() to continue.",
            tuple(Panel(inset(row, 0, 15), WHITE, text, outline=GREY) for row, text in zip(grid(INBOX_ROWS, 1), messages)),
        )

    def _sampler(self) -> Sampler:
        return partial(type_random_code, length=CODE_LENGTH[self.difficulty])

    @property
    def chance(self) -> float:
        return len(ALPHABET) ** -CODE_LENGTH[self.difficulty]
