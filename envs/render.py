"""Drawing screens with Pillow.

A task describes each screen as a few elements placed in 0..1000 units, the same units
as the action grammar's click coordinates. The same episode then renders at any screen
size, and a click hits exactly the pixels an element was drawn on (see `hits`).
Every screen is a small app window: a title bar, then the content area `CONTENT`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from envs.actions import COORDINATE_MAX, Click, to_pixel

Color = tuple[int, int, int]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in 0..1000 units; x1 and y1 exclusive

WHITE: Color = (255, 255, 255)
BLACK: Color = (20, 20, 20)
GREY: Color = (150, 150, 150)
PAPER: Color = (244, 244, 240)
TITLE_BAR: Color = (52, 58, 72)

PALETTE: dict[str, Color] = {
    "red": (214, 48, 49),
    "green": (39, 174, 96),
    "blue": (41, 98, 255),
    "orange": (243, 140, 20),
    "purple": (142, 68, 173),
    "teal": (22, 160, 160),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")

TITLE_HEIGHT = 80
CONTENT: Box = (30, TITLE_HEIGHT + 30, 970, 970)


@dataclass(frozen=True)
class Panel:
    """A filled rectangle (a button, a card, a field), with an optional centred label.
    A `monospace` label puts each character at the centre of its own equal-width cell, as
    a one-time-code display does: every label of a length then has its n-th character at
    the same place, whatever the characters (a proportional font moves them)."""

    box: Box
    fill: Color
    label: str = ""
    ink: Color = BLACK
    outline: Color | None = None
    monospace: bool = False


@dataclass(frozen=True)
class Label:
    """One line of text whose top-left corner is at `xy`; `size` is in 0..1000 units
    of the screen height."""

    xy: tuple[int, int]
    text: str
    size: int = 50
    ink: Color = BLACK


@dataclass(frozen=True)
class Icon:
    """A filled shape from `SHAPES`; `radius` is in 0..1000 units of the shorter side."""

    shape: str
    center: tuple[int, int]
    radius: int
    fill: Color


Element = Panel | Label | Icon


@dataclass(frozen=True)
class Screen:
    """What one step shows, and the instruction that comes with it."""

    title: str
    instruction: str
    elements: tuple[Element, ...] = ()
    background: Color = PAPER


def render(screen: Screen, width: int, height: int) -> np.ndarray:
    """The screenshot of `screen`: uint8, shape (height, width, 3)."""
    image = Image.new("RGB", (width, height), screen.background)
    draw = ImageDraw.Draw(image)
    _panel(draw, Panel((0, 0, COORDINATE_MAX, TITLE_HEIGHT), TITLE_BAR), width, height)
    _label(draw, _title(screen), width, height)
    for element in screen.elements:
        match element:
            case Panel():
                _panel(draw, element, width, height)
            case Label():
                _label(draw, element, width, height)
            case Icon():
                _icon(draw, element, width, height)
    return np.array(image)


def _title(screen: Screen) -> Label:
    """The window title, drawn on the title bar."""
    return Label((25, TITLE_HEIGHT // 5), screen.title, TITLE_HEIGHT * 3 // 5, WHITE)


def hits(box: Box, click: Click, width: int, height: int) -> bool:
    """Whether `click` lands on a pixel that `box` covers when drawn at this size."""
    x0, y0, x1, y1 = _pixels(box, width, height)
    return x0 <= to_pixel(click.x, width) < x1 and y0 <= to_pixel(click.y, height) < y1


def grid(rows: int, cols: int, area: Box = CONTENT) -> list[Box]:
    """`area` cut into rows x cols equal cells, row by row: a layout with no overlaps."""
    x0, y0, x1, y1 = area
    w, h = (x1 - x0) // cols, (y1 - y0) // rows
    return [(x0 + c * w, y0 + r * h, x0 + (c + 1) * w, y0 + (r + 1) * h) for r in range(rows) for c in range(cols)]


def inset(box: Box, dx: int, dy: int) -> Box:
    """`box` shrunk by dx on the left and right and dy on the top and bottom."""
    x0, y0, x1, y1 = box
    return (x0 + dx, y0 + dy, x1 - dx, y1 - dy)


def place(cell: Box, size: tuple[int, int], rng: np.random.Generator) -> Box:
    """A box of `size` at a random spot inside `cell`, so layouts vary between episodes."""
    x0, y0, x1, y1 = cell
    w, h = size
    x = x0 + int(rng.integers(0, x1 - x0 - w + 1))
    y = y0 + int(rng.integers(0, y1 - y0 - h + 1))
    return (x, y, x + w, y + h)


def _pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (x0 * width // COORDINATE_MAX, y0 * height // COORDINATE_MAX,
            x1 * width // COORDINATE_MAX, y1 * height // COORDINATE_MAX)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(size, 6))


def _pitch(font: ImageFont.FreeTypeFont) -> float:
    """A monospace label's cell width: the font's widest capital."""
    return font.getlength("W")


def _label_length(panel: Panel, font: ImageFont.FreeTypeFont) -> float:
    return len(panel.label) * _pitch(font) if panel.monospace else font.getlength(panel.label)


def _panel_font(panel: Panel, width: int, height: int) -> ImageFont.FreeTypeFont:
    """Half the panel's height, shrunk until the label fits in 90% of its width."""
    x0, y0, x1, y1 = _pixels(panel.box, width, height)
    font = _font((y1 - y0) // 2)
    longest = 0.9 * (x1 - x0)
    if _label_length(panel, font) > longest:
        font = _font(int(font.size * longest / _label_length(panel, font)))
    return font


def _monospace_centres(panel: Panel, font: ImageFont.FreeTypeFont, width: int, height: int) -> list[float]:
    """The x of each character's cell centre in a monospace label, centred in its panel."""
    x0, _, x1, _ = _pixels(panel.box, width, height)
    left = (x0 + x1) / 2 - _label_length(panel, font) / 2
    return [left + (k + 0.5) * _pitch(font) for k in range(len(panel.label))]


def _panel(draw: ImageDraw.ImageDraw, panel: Panel, width: int, height: int) -> None:
    x0, y0, x1, y1 = _pixels(panel.box, width, height)
    if x1 <= x0 or y1 <= y0:
        return
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=panel.fill, outline=panel.outline)
    if not panel.label:
        return
    font = _panel_font(panel, width, height)
    if panel.monospace:  # one character at a time, where `glyphs` says it is
        for ch, x, y in _text_centres(panel, width, height):
            draw.text((x, y), ch, fill=panel.ink, font=font, anchor="mm")
    else:
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), panel.label, fill=panel.ink, font=font, anchor="mm")


def _label_font(label: Label, height: int) -> ImageFont.FreeTypeFont:
    return _font(label.size * height // COORDINATE_MAX)


def _label(draw: ImageDraw.ImageDraw, label: Label, width: int, height: int) -> None:
    x, y = label.xy
    position = (x * width // COORDINATE_MAX, y * height // COORDINATE_MAX)
    draw.text(position, label.text, fill=label.ink, font=_label_font(label, height))


def glyphs(screen: Screen, width: int, height: int) -> list[tuple[str, float, float]]:
    """Where `render` draws each visible character of the screen's text (the title's,
    panels' and labels'), as (character, x, y) of its centre in pixels: the ground truth
    for a model learning to read screenshots. Spaces are left out."""
    return [(ch, x, y) for element in (_title(screen), *screen.elements)
            for ch, x, y in _text_centres(element, width, height) if not ch.isspace()]


def _text_centres(element: Element, width: int, height: int) -> list[tuple[str, float, float]]:
    match element:
        case Panel(label=text) if text:
            x0, y0, x1, y1 = _pixels(element.box, width, height)
            font, middle = _panel_font(element, width, height), (y0 + y1) / 2
            if element.monospace:
                xs = _monospace_centres(element, font, width, height)
            else:
                xs = _proportional_centres(text, font, (x0 + x1) / 2 - font.getlength(text) / 2)
        case Label(text=text):
            font = _label_font(element, height)
            top = font.getbbox(text)
            middle = element.xy[1] * height // COORDINATE_MAX + (top[1] + top[3]) / 2
            xs = _proportional_centres(text, font, element.xy[0] * width // COORDINATE_MAX)
        case _:
            return []
    return [(ch, x, middle) for ch, x in zip(text, xs)]


def _proportional_centres(text: str, font: ImageFont.FreeTypeFont, left: float) -> list[float]:
    return [left + font.getlength(text[:k]) + font.getlength(ch) / 2 for k, ch in enumerate(text)]


def _icon(draw: ImageDraw.ImageDraw, icon: Icon, width: int, height: int) -> None:
    cx, cy = icon.center[0] * width // COORDINATE_MAX, icon.center[1] * height // COORDINATE_MAX
    r = max(icon.radius * min(width, height) // COORDINATE_MAX, 2)
    match icon.shape:
        case "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=icon.fill)
        case "square":
            draw.regular_polygon((cx, cy, r), 4, fill=icon.fill)
        case "diamond":
            draw.regular_polygon((cx, cy, r), 4, rotation=45, fill=icon.fill)
        case "triangle":
            draw.regular_polygon((cx, cy, r), 3, fill=icon.fill)
        case "hexagon":
            draw.regular_polygon((cx, cy, r), 6, fill=icon.fill)
        case "star":
            points = [
                (cx + radius * math.sin(k * math.pi / 5), cy - radius * math.cos(k * math.pi / 5))
                for k, radius in zip(range(10), [r, r * 0.45] * 5)
            ]
            draw.polygon(points, fill=icon.fill)
        case _:
            raise ValueError(f"unknown shape {icon.shape!r}")
