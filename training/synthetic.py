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
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gymnasium as gym
from PIL import Image

import envs  # noqa: F401  (registers the tasks)
from envs.actions import Click, format_action
from envs.base import Episode
from envs.render import PALETTE, TITLE_HEIGHT, Icon, Label, Panel, Screen, render

COLOR_NAMES = {rgb: name for name, rgb in PALETTE.items()}
SIZE = 336  # the envs' default screen, which the agent sees


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
    """Writes PNGs under ``root/images`` and JSONL records to ``root/<name>.jsonl``."""

    root: Path
    count: int = 0

    def image(self, screen: Screen) -> str:
        name = f"images/{self.count:07d}.png"
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
            out.append((f'Click the "{p.label}" button.', format_action(Click(*_centre(p.box)))))
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


def _ink(element: Panel | Label | Icon) -> tuple[int, int, int, int]:
    """The box an element's text or shape covers, in 0..1000 units (a text's width
    estimated from its length: glyphs average about 0.55 of the font size)."""
    match element:
        case Panel():  # the label is centred, at half the panel's height, shrunk to fit
            x0, y0, x1, y1 = element.box
            size = (y1 - y0) // 2
            width = min(int(0.9 * (x1 - x0)), len(element.label) * size * 11 // 20)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            return cx - width // 2, cy - size // 2, cx + width // 2 + 1, cy + size // 2 + 1
        case Label():
            x, y = element.xy
            return x, y, x + len(element.text) * element.size * 11 // 20 + 1, y + element.size
        case Icon():
            (x, y), r = element.center, element.radius
            return x - r, y - r, x + r + 1, y + r + 1


def cell_texts(screen: Screen, side: int) -> list[str]:
    """What each cell of a ``side`` x ``side`` grid over the screen shows, row by row:
    the title, each element's text or icon, with its centre in the action grammar's
    units ("Save 314 219"), in every cell its ink overlaps. This is what
    ``training.tower`` teaches each pooled image token to see."""
    title = Label((25, TITLE_HEIGHT // 5), screen.title, TITLE_HEIGHT * 3 // 5)
    cells: list[list[str]] = [[] for _ in range(side * side)]
    for element in (title, *screen.elements):
        if not (text := describe(element) if not isinstance(element, Panel) else element.label):
            continue
        x0, y0, x1, y1 = _ink(element)
        if isinstance(element, Panel):  # where to click it
            x0_, y0_, x1_, y1_ = element.box
            text = f"{text} {(x0_ + x1_) // 2} {(y0_ + y1_) // 2}"
        columns = range(max(0, x0) * side // 1000, min(side, (min(x1, 1000) - 1) * side // 1000 + 1))
        for row in range(max(0, y0) * side // 1000, min(side, (min(y1, 1000) - 1) * side // 1000 + 1)):
            for column in columns:
                cells[row * side + column].append(text)
    return ["; ".join(texts) for texts in cells]


def _draw(rng: random.Random, seed: int, k: int, weights: dict[str, float]) -> tuple[str, Episode]:
    task = rng.choices(list(weights), list(weights.values()))[0]
    return task, episode(task, seed * 1_000_003 + k, **TASKS[task])


def _screens(seed: int, n: int, weights: dict[str, float]) -> Iterator[Screen]:
    """``n`` screens, each drawn from an episode of a task picked by weight."""
    rng = random.Random(seed)
    for k in range(n):
        _, ep = _draw(rng, seed, k, weights)
        yield ep.screens[rng.randrange(len(ep.screens))]


def screens(writer: Writer, n: int, seed: int, weights: dict[str, float], side: int) -> Path:
    """``n`` screens with what each cell of a ``side`` x ``side`` grid shows, for ``training.tower``."""
    records = ({"image": writer.image(s), "cells": cell_texts(s, side)} for s in _screens(seed, n, weights))
    return writer.write("screens", records)


def captions(writer: Writer, n: int, seed: int, weights: dict[str, float]) -> Path:
    """``n`` screens, each with its caption."""
    records = (_qa("Describe the screen.", caption(s), [writer.image(s)]) for s in _screens(seed, n, weights))
    return writer.write("captions", records)


def questions(writer: Writer, n: int, seed: int, weights: dict[str, float]) -> Path:
    """``n`` single-screen questions from the weighted tasks."""
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

    return writer.write("questions", records())


# ----------------------------------------------------------------------------- sequences
SEQUENCE_TASKS = {  # task -> (constructor arguments, memory spans to draw from)
    "RecallCode": (dict(difficulty="easy"), (1, 2, 3)),
    "ClickTarget": (dict(difficulty="easy"), (1, 2)),
    "OrderEvents": (dict(difficulty="easy"), (2, 3, 4)),
    "CountEvents": (dict(difficulty="easy"), (2, 3)),
    "NeedleFrame": (dict(difficulty="easy"), (2, 4, 6)),
}


def sequences(writer: Writer, n: int, seed: int, weights: dict[str, float], tiles_share: float = 0.1) -> Path:
    """``n`` multi-screen samples: a short episode's screens as images (NeedleFrame's as a
    video) and the question its last screen asks; a ``tiles_share`` of them is instead one
    toolbar as a tiled high-resolution image."""
    rng = random.Random(seed)

    def records() -> Iterator[dict]:
        for k in range(n):
            if rng.random() < tiles_share:
                ep = episode("ClickTarget", seed * 1_000_003 + k, difficulty="easy")
                yield {**_qa(ep.screens[0].instruction, format_action(ep.solution), [writer.image(ep.screens[0])]),
                       "tiles": True}
                continue
            task = rng.choices(list(weights), list(weights.values()))[0]
            kwargs, spans = SEQUENCE_TASKS[task]
            ep = episode(task, seed * 1_000_003 + k, memory_span=rng.choice(spans), **kwargs)
            *watched, question = ep.screens
            answer = format_action(ep.solution)
            if task == "NeedleFrame":  # the frames as a video, then the quiz screen
                frames = [writer.image(s) for s in watched]
                yield {**_qa("<video>\n<image>\n" + question.instruction, answer, prefix=""),
                       "image": [writer.image(question)], "video": frames}
            else:
                yield _qa(question.instruction, answer, [writer.image(s) for s in ep.screens])

    return writer.write("sequences", records())


def texts(writer: Writer, n: int, seed: int) -> Path:
    """``n`` text-only samples: a screen's content as text, then its question."""
    rng = random.Random(seed)

    def records() -> Iterator[dict]:
        for k in range(n):
            task = rng.choice(["RecallCode", "ClickTarget"])
            ep = episode(task, seed * 1_000_003 + k, **TASKS[task])
            shown = "\n".join(caption(s) for s in ep.screens[:-1]) if task == "RecallCode" else caption(ep.screens[0])
            yield _qa(f"{shown}\n{ep.screens[-1].instruction}", format_action(ep.solution))

    return writer.write("texts", records())
