"""ClickTarget: click the named button among several.

A perception check with short memory. With `memory_span` 0 (the default) the question
screen itself names the button. With a longer span a note names it first, toolbars of
other buttons follow, and the question screen asks for "the button from the note".
The random baseline clicks anywhere, so its chance is one button's share of the screen.
The solution names the button before its centre, `click("Save", x, y)`; a click is scored
by its point alone, so `click(x, y)` at the same point is right too. The rationale
(`info["rationale"]` at the question) reads the toolbar's buttons out, with their centres.
"""

from __future__ import annotations

import numpy as np

from envs.actions import Click
from envs.base import Episode, ScreenEnv, one, pick
from envs.render import PALETTE, WHITE, Panel, Screen, grid, place
from envs.spaces import Sampler, uniform_click

LABELS = (
    "Save", "Open", "Print", "Share", "Delete", "Copy", "Paste", "Undo", "Redo", "Help",
    "Send", "Close", "Search", "Edit", "Export", "Import", "Rename", "Upload", "Refresh", "Zoom",
)
# difficulty -> (grid rows, grid columns, buttons on screen, button size in 0..1000 units)
LAYOUT = {
    "easy": (2, 2, 3, (300, 150)),
    "medium": (3, 3, 6, (240, 120)),
    "hard": (4, 4, 12, (180, 90)),
}
NOTE_YELLOW = (255, 236, 140)


class ClickTargetEnv(ScreenEnv):
    default_memory_span = 0
    min_memory_span = 0

    def _make_episode(self, rng: np.random.Generator) -> Episode:
        target, *_ = buttons = self._toolbar(rng)
        name = target.label
        if self.memory_span == 0:
            question = f'Click the "{name}" button.'
            toolbar = Screen("Toolbar", question, buttons)
            return Episode((toolbar,), _click_on(target), target.box, read_out(toolbar))
        note = Screen(
            "Note",
            "Remember the button this note names; you will click it later. Reply wait() to continue.",
            (Panel((150, 400, 850, 650), NOTE_YELLOW, f'Later, click "{name}"'),),
        )
        keep_in_mind = "Keep the note in mind. Reply wait() to continue."
        toolbars = [Screen("Toolbar", keep_in_mind, self._toolbar(rng)) for _ in range(self.memory_span - 1)]
        question = Screen("Toolbar", "Click the button that the note named.", buttons)
        return Episode((note, *toolbars, question), _click_on(target), target.box, read_out(question))

    def _toolbar(self, rng: np.random.Generator) -> tuple[Panel, ...]:
        """Buttons with distinct labels in distinct cells; colours may repeat."""
        rows, cols, count, size = LAYOUT[self.difficulty]
        cells = pick(rng, grid(rows, cols), count)
        return tuple(
            Panel(place(cell, size, rng), one(rng, list(PALETTE.values())), label, WHITE)
            for cell, label in zip(cells, pick(rng, LABELS, count))
        )

    def _sampler(self) -> Sampler:
        return uniform_click

    @property
    def chance(self) -> float:
        width, height = LAYOUT[self.difficulty][3]
        return width * height / 1001**2


def _click_on(button: Panel) -> Click:
    """A click at the button's centre that names it: click("Save", x, y)."""
    x0, y0, x1, y1 = button.box
    return Click((x0 + x1) // 2, (y0 + y1) // 2, button.label)


def read_out(screen: Screen) -> str:
    """The screen's labelled buttons in reading order (top to bottom by centre, then left
    to right), each with its centre: 'Zoom 248,192; Rename 671,187; Send 231,750'.

    The oracle writes this before its click (``info["rationale"]``): reading the toolbar
    out first turns the click into a lookup in text, which a small hybrid learns, where
    it does not learn the same lookup among image tokens (docs/benchmarks.md)."""
    clicks = [_click_on(e) for e in screen.elements if isinstance(e, Panel) and e.label]
    return "; ".join(f"{c.target} {c.x},{c.y}" for c in sorted(clicks, key=lambda c: (c.y, c.x)))
