"""``envs.render.glyphs``, the ground truth a tower learns to read from, checked against
the pixels ``render`` draws; and ``training.synthetic.cell_slots`` built on it."""

import math

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401
from envs.render import glyphs, render

TASKS = ["RecallCode", "ClickTarget", "CountEvents", "OrderEvents", "NeedleFrame"]


def screens(task, seeds=range(3)):
    for seed in seeds:
        env = gym.make(f"longllava/{task}-v0", difficulty="easy")
        env.reset(seed=seed)
        yield from env.unwrapped._episode.screens


def ink_near(image: np.ndarray, x: float, y: float, reach: int) -> bool:
    """Whether the window around (x, y) holds more than one colour: a glyph's centre is on
    its strokes or in its counter (the hole of an "O"), never on a flat fill away from it."""
    window = image[max(0, int(y) - reach): int(y) + reach + 1, max(0, int(x) - reach): int(x) + reach + 1]
    return len(np.unique(window.reshape(-1, 3), axis=0)) > 1


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("size", [336, 168])
def test_every_glyph_centre_is_on_drawn_ink(task, size):
    for screen in screens(task):
        image = render(screen, size, size)
        found = glyphs(screen, size, size)
        assert found, screen.title
        reach = size // 60 + 1  # a third of the smallest glyph's width
        assert all(ink_near(image, x, y, reach) for _, x, y in found), screen.title
        assert all(0 <= x < size and 0 <= y < size and not ch.isspace() for ch, x, y in found)


def test_a_label_reads_left_to_right_inside_its_panel():
    from envs.render import Panel

    screen = next(iter(screens("RecallCode")))
    code = next(e for e in screen.elements if isinstance(e, Panel) and e.label)
    found = [(ch, x, y) for ch, x, y in glyphs(screen, 1000, 1000) if code.box[1] <= y < code.box[3]]
    assert "".join(ch for ch, _, _ in found) == code.label
    xs = [x for _, x, _ in found]
    assert xs == sorted(xs) and code.box[0] < xs[0] and xs[-1] < code.box[2]


def test_cell_slots_spell_the_code_in_reading_order_and_mark_where_to_click():
    from training.synthetic import CELL_SLOTS, EMPTY, LABEL_SLOTS, cell_slots

    for screen in screens("RecallCode", range(10)):
        if screen.title != "Sign-in" or "Remember" not in screen.instruction:
            continue
        cells = cell_slots(screen, 6)
        assert len(cells) == 36 and all(len(cell) == CELL_SLOTS for cell in cells)
        code = next(e.label for e in screen.elements if getattr(e, "label", ""))
        row = "".join(cell[:8] for cell in cells[18:24])  # the code's row, glyph slots only
        assert row.replace(EMPTY, "").endswith(code) or code in row.replace(EMPTY, "")
        assert all(cell[LABEL_SLOTS] == code[:4] for cell in cells)  # a screen's only panel, in every cell
    for screen in screens("ClickTarget", range(5)):
        cells = cell_slots(screen, 6, reach=None)
        centres = sorted(cell[8:14] for cell in cells if cell[8:14].strip())
        buttons = sorted(f"{(b[0] + b[2]) // 2:03d}{(b[1] + b[3]) // 2:03d}" for b in (e.box for e in screen.elements))
        assert centres == buttons


@pytest.mark.parametrize("near", [False, True], ids=["every cell", "cells near a button"])
def test_cells_name_the_nearest_button_and_where_to_click_it(near):
    """The key (a label's first letters) and the value (its centre) sit in one token, and
    every token a button covers holds them: they are that button's, not a neighbour's.
    With a reach, the cells far from every button hold neither label nor centre; without
    one, every cell holds its nearest button's."""
    from training.synthetic import CENTRE_SLOTS, LABEL_REACH, LABEL_SLOTS, cell_slots

    for screen in screens("ClickTarget", range(10)):
        cells = cell_slots(screen, 6, LABEL_REACH if near else math.inf)
        named = {cell[LABEL_SLOTS].strip(): cell[CENTRE_SLOTS] for cell in cells if cell[LABEL_SLOTS].strip()}
        buttons = {e.label[:4]: f"{(e.box[0] + e.box[2]) // 2:03d}{(e.box[1] + e.box[3]) // 2:03d}" for e in screen.elements}
        assert named == buttons  # each button in some cell, with its own centre, and nothing else
        for k, cell in enumerate(cells):
            x, y = (k % 6 + 0.5) * 1000 / 6, (k // 6 + 0.5) * 1000 / 6
            covering = [e for e in screen.elements if e.box[0] <= x <= e.box[2] and e.box[1] <= y <= e.box[3]]
            if covering:
                assert cell[LABEL_SLOTS].strip() == covering[0].label[:4]
            gaps = [max(e.box[0] - x, 0, x - e.box[2], e.box[1] - y, 0, y - e.box[3]) for e in screen.elements]
            if near and min(gaps) >= LABEL_REACH:  # farther than the reach along one axis at least
                assert not cell[LABEL_SLOTS].strip() and not cell[CENTRE_SLOTS].strip()
            elif cell[LABEL_SLOTS].strip():
                assert buttons[cell[LABEL_SLOTS].strip()] == cell[CENTRE_SLOTS]
            else:
                assert near and not cell[CENTRE_SLOTS].strip()
        assert any(not cell[LABEL_SLOTS].strip() for cell in cells) == near


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_every_access_code_of_a_length_puts_its_characters_at_the_same_places(difficulty):
    """The code panel is monospace: a proportional font would move the n-th character
    with the widths of those before it, and a tower's fixed reading slots would miss it."""
    places = set()
    for seed in range(40):
        env = gym.make("longllava/RecallCode-v0", difficulty=difficulty, memory_span=1)
        env.reset(seed=seed)
        shown = env.unwrapped._episode.screens[0]
        code = env.unwrapped._episode.solution.text
        found = [(ch, x, y) for ch, x, y in glyphs(shown, 336, 336) if 140 <= y < 208]  # the code panel's rows
        assert "".join(ch for ch, _, _ in found) == code
        places.add(tuple((x, y) for _, x, y in found))
    assert len(places) == 1
