"""Synthetic training data from the envs' own screens, written as LLaVA-format JSONL.

Every image is a real screenshot that an env renders at its default 336x336 (the size
the agent sees), saved as PNG. Screens come from ``env.reset(seed)``: an episode's
screens are its ground truth (``envs.base.Episode``), so captions, questions and
answers are exact. One generator per stage:

- ``screens``    (tower pretraining) what each cell of each screen shows (``training.tower``);
- ``captions``   (align) each screen described: its title and every element's text,
                 with panel centres in the action grammar's 0..1000 units;
- ``questions``  (single) one screen, one question: the access code shown, where to
                 click a named button, what a note names, which icons or words appear;
- ``sequences``  (multi) several screens as one sample, as images or as a video, asked
                 what the task asks at its end; and toolbars as tiled high-res images;
- ``texts``      (text) the same questions with the screen's content given as text.

Trajectories for fine-tuning come from oracle rollouts instead (``training.trajectories``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import gymnasium as gym
from PIL import Image

import envs  # noqa: F401  (registers the tasks)
from envs.actions import Click, format_action
from envs.base import Episode, expert_reply
from envs.render import PALETTE, Icon, Label, Panel, Screen, glyphs, render
from envs.tasks.click_target import read_out

COLOR_NAMES = {rgb: name for name, rgb in PALETTE.items()}
SIZE = 336  # the envs' default screen, which the agent sees


EVAL_SEED = 1_000_000  # evaluation plays seeds from here on; every training episode's seed is below


def data_seed(seed: int, k: int) -> int:
    """The env seed of a file's ``k``-th training episode: the file's ``seed`` picks a
    stretch of 50,000, and every seed stays below ``EVAL_SEED`` (an episode's content,
    an access code say, follows from its seed whatever the memory span)."""
    return (seed * 50_000 + k) % EVAL_SEED


def episode(task: str, seed: int, **kwargs) -> Episode:
    """The episode that ``longllava/<task>-v0`` plays for ``seed``: its screens and answer."""
    env = gym.make(f"longllava/{task}-v0", **kwargs)
    env.reset(seed=seed)
    return env.unwrapped._episode


def _centre(box: tuple[int, int, int, int]) -> tuple[int, int]:
    x0, y0, x1, y1 = box
    return (x0 + x1) // 2, (y0 + y1) // 2


def describe(element: Panel | Label | Icon) -> str | None:
    match element:
        case Panel(label=""):
            return None
        case Panel():
            x, y = _centre(element.box)
            return f'"{element.label}" at ({x}, {y})'
        case Label():
            return element.text
        case Icon():
            return f"{COLOR_NAMES.get(element.fill, 'a')} {element.shape}"
    return None


def caption(screen: Screen) -> str:
    parts = [d for d in map(describe, screen.elements) if d]
    return f"{screen.title}: " + ("; ".join(parts) if parts else "nothing else") + "."


@dataclass
class Writer:
    """Writes PNGs under ``root/images`` and JSONL records to ``root/<name>.jsonl``. Writers
    with different prefixes can share ``root`` from different processes."""

    root: Path
    prefix: str = ""
    count: int = 0

    def image(self, screen: Screen) -> str:
        name = f"images/{self.prefix}{self.count:07d}.png"
        self.count += 1
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(screen, SIZE, SIZE)).save(self.root / name, compress_level=1)
        return name

    def write(self, name: str, records: Iterator[dict]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for k, record in enumerate(records):
                f.write(json.dumps({"id": f"{name}-{k}", **record}, ensure_ascii=False) + "\n")
        return path


def _qa(question: str, answer: str, images: list[str] | None = None, prefix: str = "<image>\n") -> dict:
    record = {"conversations": [{"from": "human", "value": (prefix * len(images or [])) + question},
                                {"from": "gpt", "value": answer}]}
    if images:
        record["image"] = images
    return record


# ----------------------------------------------------------------------------- per screen
def screen_questions(task: str, ep: Episode, t: int) -> list[tuple[str, str]]:
    """Questions about screen ``t`` of an episode that its pixels alone answer."""
    screen = ep.screens[t]
    panels = [e for e in screen.elements if isinstance(e, Panel) and e.label]
    icons = [e for e in screen.elements if isinstance(e, Icon)]
    out: list[tuple[str, str]] = []
    if task == "RecallCode" and t == 0:
        out.append(("What is the access code?", panels[0].label))
    if task == "ClickTarget" and screen.title == "Toolbar":
        for p in panels:
            out.append((f'Click the "{p.label}" button.', expert_reply(format_action(Click(*_centre(p.box), p.label)),
                                                                        read_out(screen))))
    if screen.title == "Note":
        out.append(("Which button does the note name?", panels[0].label.split('"')[1]))
    if icons and screen.title == "Monitor":
        out.append(("Which icons are shown?", ", ".join(describe(i) for i in icons)))
    if screen.title == "Notifications":
        out.append(("Which words are on the cards?", ", ".join(p.label for p in panels)))
    if screen.title == "Video":
        says = [p.label for p in panels]
        out.append(("What does the caption say?", says[0] if says else "There is no caption."))
    return out


TASKS = {  # task -> constructor arguments for short episodes that cover every screen kind
    "RecallCode": dict(difficulty="easy", memory_span=2),
    "ClickTarget": dict(difficulty="easy"),
    "CountEvents": dict(difficulty="easy", memory_span=3),
    "OrderEvents": dict(difficulty="easy", memory_span=3),
    "NeedleFrame": dict(difficulty="easy", memory_span=2),
}


GLYPH_ROWS, GLYPH_COLUMNS = 2, 4  # glyph slots in each cell: two lines of four
GLYPH_SLOTS = GLYPH_ROWS * GLYPH_COLUMNS
CENTRE_SLOTS = slice(GLYPH_SLOTS, GLYPH_SLOTS + 6)  # a labelled panel's centre, "xxxyyy"
ICON_SLOTS = slice(GLYPH_SLOTS + 6, GLYPH_SLOTS + 8)  # an icon's colour and shape
LABEL_SLOTS = slice(GLYPH_SLOTS + 8, GLYPH_SLOTS + 12)  # that panel's label's first letters
CELL_SLOTS = GLYPH_SLOTS + 12
EMPTY = " "  # a slot that shows nothing (spaces are never a glyph)
SHAPE_CODES = {"circle": "c", "square": "q", "triangle": "t", "diamond": "d", "star": "s", "hexagon": "h"}


LABEL_REACH = 84  # action-grammar units: about half a cell of the 6 x 6 grid (``bench/clicking.py``)


def cell_slots(screen: Screen, side: int, reach: float | None = LABEL_REACH) -> list[str]:
    """What each cell of a ``side`` x ``side`` grid over the screen shows, row by row, as
    ``CELL_SLOTS`` characters at fixed places. This is what ``training.tower`` teaches
    each pooled image token to see:

    - each glyph whose centre falls in the cell, in the slot of its sub-cell (two rows
      of four): a slot depends on pixels at a fixed place, which a patch tower learns
      quickly (whole strings per cell were learnt at chance level);
    - the colour's initial and shape code of an icon centred in the cell;
    - the centre, in the action grammar's units, and the label's first letters of the
      labelled panel nearest the cell (the one it lies in, if any), if the cell lies
      within ``reach`` of it or it is the screen's only one: where to click it and what
      it is called, in the same token. A click needs both, and an LLM learns the lookup
      from tokens that hold the key beside the value far sooner than from one token per
      button, and the copy of a lone button's centre soonest when every token holds it
      (``bench/clicking.py``). The far cells hold neither: a tower whose every cell names
      a centre spends itself on those and reads about a quarter of a toolbar's label
      letters, one that names them near a button only reads most of them
      (docs/benchmarks.md, sessions 17 to 19 and 23).
      ``reach=math.inf`` names the nearest panel in every cell; ``reach=None`` puts a
      panel's centre only in the cell that holds it, and no label (the towers before)."""
    cells = [[EMPTY] * CELL_SLOTS for _ in range(side * side)]

    def cell(x: float, y: float, scale: float) -> tuple[list[str], float, float]:
        fx, fy = min(x * side / scale, side - 1e-6), min(y * side / scale, side - 1e-6)
        return cells[int(fy) * side + int(fx)], fx % 1, fy % 1

    for ch, x, y in glyphs(screen, SIZE, SIZE):
        slots, fx, fy = cell(x, y, SIZE)
        slots[int(fy * GLYPH_ROWS) * GLYPH_COLUMNS + int(fx * GLYPH_COLUMNS)] = ch
    for icon in (e for e in screen.elements if isinstance(e, Icon)):
        slots, _, _ = cell(*icon.center, 1000)
        slots[ICON_SLOTS] = COLOR_NAMES.get(icon.fill, "?")[0], SHAPE_CODES[icon.shape]
    panels = [e for e in screen.elements if isinstance(e, Panel) and e.label]
    if reach is None:
        for panel in panels:
            slots, _, _ = cell(*_centre(panel.box), 1000)
            slots[CENTRE_SLOTS] = centre_code(panel.box)
        return ["".join(slots) for slots in cells]
    for k, slots in enumerate(cells):
        x, y = (k % side + 0.5) * 1000 / side, (k // side + 0.5) * 1000 / side
        if panels:
            panel = min(panels, key=lambda p: (_distance(p.box, x, y), math.dist(_centre(p.box), (x, y))))
            if len(panels) == 1 or _distance(panel.box, x, y) < reach:
                slots[CENTRE_SLOTS] = centre_code(panel.box)
                slots[LABEL_SLOTS] = panel.label[:4].ljust(4)
    return ["".join(slots) for slots in cells]


def centre_code(box: tuple[int, int, int, int]) -> str:
    """What a cell's centre slots hold for the panel at ``box``: its centre as "xxxyyy"."""
    cx, cy = (min(v, 999) for v in _centre(box))
    return f"{cx:03d}{cy:03d}"


def _distance(box: tuple[int, int, int, int], x: float, y: float) -> float:
    """How far the point is from the box (0 inside)."""
    x0, y0, x1, y1 = box
    return math.hypot(max(x0 - x, 0, x - x1), max(y0 - y, 0, y - y1))


def _draw(rng: random.Random, seed: int, k: int, weights: dict[str, float]) -> tuple[str, Episode]:
    task = rng.choices(list(weights), list(weights.values()))[0]
    return task, episode(task, data_seed(seed, k), **TASKS[task])


def _screens(seed: int, n: int, weights: dict[str, float], first_share: float = 0.0) -> Iterator[Screen]:
    """``n`` screens, each drawn from an episode of a task picked by weight; the episode's
    first screen (what a task asks to remember) at least ``first_share`` of the time."""
    rng = random.Random(seed)
    for k in range(n):
        _, ep = _draw(rng, seed, k, weights)
        yield ep.screens[0 if rng.random() < first_share else rng.randrange(len(ep.screens))]


def screens(writer: Writer, n: int, seed: int, weights: dict[str, float], side: int, name: str = "screens") -> Path:
    """``n`` screens with what each cell of a ``side`` x ``side`` grid shows, for
    ``training.tower``, in ``<name>.jsonl``; 60% are first screens, which show what the
    tasks ask about."""
    records = ({"image": writer.image(s), "cells": cell_slots(s, side)} for s in _screens(seed, n, weights, 0.6))
    return writer.write(name, records)


def captions(writer: Writer, n: int, seed: int, weights: dict[str, float]) -> Path:
    """``n`` screens, each with its caption."""
    records = (_qa("Describe the screen.", caption(s), [writer.image(s)]) for s in _screens(seed, n, weights))
    return writer.write("captions", records)


def questions(writer: Writer, n: int, seed: int, weights: dict[str, float], name: str = "questions") -> Path:
    """``n`` single-screen questions from the weighted tasks, in ``<name>.jsonl``."""
    rng = random.Random(seed)

    def records() -> Iterator[dict]:
        made = k = 0
        while made < n:
            task, ep = _draw(rng, seed, k, weights)
            k += 1
            options = [(t, q) for t in range(len(ep.screens)) for q in screen_questions(task, ep, t)]
            if not options:
                continue
            t, (question, answer) = rng.choice(options)
            made += 1
            yield _qa(question, answer, [writer.image(ep.screens[t])])

    return writer.write(name, records())


def named_alone(ep: Episode) -> Screen:
    """A ClickTarget episode's toolbar with only the button that its question names."""
    screen = ep.screens[-1]
    return replace(screen, elements=tuple(e for e in screen.elements if e.box == ep.target))


def clicks(writer: Writer, n: int, seed: int, alone_share: float, name: str = "clicks") -> Path:
    """``n`` ClickTarget toolbars, each asking for its named button, in ``<name>.jsonl``;
    an ``alone_share`` of them show that button alone. With one button there is nothing
    to choose, only a centre to copy, which every token near the button holds: the LLM
    learns that copy first, and the choice by label among three after it
    (``bench/clicking.py``)."""
    rng = random.Random(seed)

    def records() -> Iterator[dict]:
        for k in range(n):
            ep = episode("ClickTarget", data_seed(seed, k), difficulty="easy")
            screen = named_alone(ep) if rng.random() < alone_share else ep.screens[0]
            yield _qa(screen.instruction, expert_reply(format_action(ep.solution), read_out(screen)),
                      [writer.image(screen)])

    return writer.write(name, records())


# ----------------------------------------------------------------------------- sequences
SEQUENCE_TASKS = {  # task -> (constructor arguments, memory spans to draw from)
    "RecallCode": (dict(difficulty="easy"), (1, 2, 3)),
    "ClickTarget": (dict(difficulty="easy"), (1, 2)),
    "OrderEvents": (dict(difficulty="easy"), (2, 3, 4)),
    "CountEvents": (dict(difficulty="easy"), (2, 3)),
    "NeedleFrame": (dict(difficulty="easy"), (2, 4, 6)),
}


def sequences(writer: Writer, n: int, seed: int, weights: dict[str, float], tiles_share: float = 0.1,
              name: str = "sequences", spans: tuple[int, ...] | None = None) -> Path:
    """``n`` multi-screen samples, in ``<name>.jsonl``: a short episode's screens as images
    (NeedleFrame's as a video) and the question its last screen asks; a ``tiles_share`` of
    them is instead one toolbar as a tiled high-resolution image. ``spans``: the memory
    spans to draw from instead of each task's own short ones."""
    rng = random.Random(seed)

    def records() -> Iterator[dict]:
        for k in range(n):
            if rng.random() < tiles_share:
                ep = episode("ClickTarget", data_seed(seed, k), difficulty="easy")
                yield {**_qa(ep.screens[0].instruction, ep.reply(), [writer.image(ep.screens[0])]),
                       "tiles": True}
                continue
            task = rng.choices(list(weights), list(weights.values()))[0]
            kwargs, task_spans = SEQUENCE_TASKS[task]
            ep = episode(task, data_seed(seed, k), memory_span=rng.choice(spans or task_spans), **kwargs)
            *watched, question = ep.screens
            answer = ep.reply()
            if task == "NeedleFrame":  # the frames as a video, then the quiz screen
                frames = [writer.image(s) for s in watched]
                yield {**_qa("<video>\n<image>\n" + question.instruction, answer, prefix=""),
                       "image": [writer.image(question)], "video": frames}
            else:
                yield _qa(question.instruction, answer, [writer.image(s) for s in ep.screens])

    return writer.write(name, records())


def texts(writer: Writer, n: int, seed: int) -> Path:
    """``n`` text-only samples: a screen's content as text, then its question."""
    rng = random.Random(seed)

    def records() -> Iterator[dict]:
        for k in range(n):
            task = rng.choice(["RecallCode", "ClickTarget"])
            ep = episode(task, data_seed(seed, k), **TASKS[task])
            shown = "\n".join(caption(s) for s in ep.screens[:-1]) if task == "RecallCode" else caption(ep.screens[0])
            yield _qa(f"{shown}\n{ep.screens[-1].instruction}", ep.reply())

    return writer.write("texts", records())
