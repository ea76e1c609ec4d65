"""The action grammar: the text an agent emits, read as a typed action.

    click(x, y)      x and y are integers in 0..1000, relative to the screenshot's
                     width and height (the UI-TARS v1 / CogAgent / OS-Atlas convention)
    click("name", x, y)  the same click, naming what it means to hit first: a model that
                     writes the name has it at hand when it writes the point (see
                     docs/benchmarks.md); an env scores the point alone
    type("text")     type text into the focused field
    scroll(dx, dy)   integers in -1000..1000 (a screen's span); positive dy scrolls down,
                     positive dx scrolls right
    key("name")      press a key: key("Enter"), key("a"), key("ctrl+a")
    wait()           do nothing this step
    answer("text")   give the final answer

String arguments are JSON string literals (double quotes, backslash escapes) holding
text that UTF-8 can encode (no lone surrogates). Spaces around tokens are allowed;
anything else is malformed.

This module is the grammar's one truth. The agent's typed actions (agent/actions.py)
must mean the same: its tests check, for every action kind, that each side reads the
other's text as the same action and that both refuse the same out-of-range values. The
env tasks import nothing outside envs, so the agent cannot be the truth.

`parse_action` never raises: a malformed string gives None, which an environment
scores as a wrong action. `format_action` writes the canonical text, and
`parse_action(format_action(a)) == a` for every action that `parse_action` can return.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

COORDINATE_MAX = 1000  # click coordinates run over 0..COORDINATE_MAX on both axes
SCROLL_MAX = 1000  # scroll amounts run over -SCROLL_MAX..SCROLL_MAX


@dataclass(frozen=True)
class Click:
    x: int
    y: int
    target: str = ""  # what the click means to hit, as click("target", x, y) writes it


@dataclass(frozen=True)
class TypeText:
    text: str


@dataclass(frozen=True)
class Scroll:
    dx: int
    dy: int


@dataclass(frozen=True)
class Key:
    name: str


@dataclass(frozen=True)
class Wait:
    pass


@dataclass(frozen=True)
class Answer:
    text: str


Action = Click | TypeText | Scroll | Key | Wait | Answer

_CALL = re.compile(r"\s*([a-z]+)\s*\((.*)\)\s*", re.DOTALL)
# ASCII digits only: int() would also accept other scripts' digits. Nine digits at
# most keeps int() far from Python's limit on digit strings.
_TWO_INTS = re.compile(r"\s*([+-]?[0-9]{1,9})\s*,\s*([+-]?[0-9]{1,9})\s*")
_ONE_STRING = re.compile(r'\s*("(?:[^"\\]|\\.)*")\s*', re.DOTALL)
_STRING_TWO_INTS = re.compile(r'\s*("(?:[^"\\]|\\.)*")\s*,\s*([+-]?[0-9]{1,9})\s*,\s*([+-]?[0-9]{1,9})\s*', re.DOTALL)
_NOTHING = re.compile(r"\s*")


def parse_action(text: str) -> Action | None:
    """The action `text` spells, or None if it is not in the grammar."""
    if not isinstance(text, str):
        return None
    call = _CALL.fullmatch(text)
    if call is None:
        return None
    verb, args = call.groups()
    if verb == "click" and (named := _STRING_TWO_INTS.fullmatch(args)):
        target = _string(named[1])
        return _click(named[2], named[3], target) if target else None
    if verb == "click":
        numbers = _TWO_INTS.fullmatch(args)
        return _click(numbers[1], numbers[2]) if numbers else None
    if verb == "scroll":
        numbers = _TWO_INTS.fullmatch(args)
        if numbers is None:
            return None
        dx, dy = int(numbers[1]), int(numbers[2])
        return Scroll(dx, dy) if abs(dx) <= SCROLL_MAX and abs(dy) <= SCROLL_MAX else None
    if verb in ("type", "key", "answer"):
        literal = _ONE_STRING.fullmatch(args)
        value = _string(literal[1]) if literal else None
        if value is None:
            return None
        if verb == "type":
            return TypeText(value)
        if verb == "answer":
            return Answer(value)
        return Key(value) if value else None
    if verb == "wait" and _NOTHING.fullmatch(args):
        return Wait()
    return None


def _click(x: str, y: str, target: str = "") -> Click | None:
    x, y = int(x), int(y)
    return Click(x, y, target) if 0 <= x <= COORDINATE_MAX and 0 <= y <= COORDINATE_MAX else None


def _string(literal: str) -> str | None:
    """A JSON string literal's text, or None if it cannot be read or typed."""
    try:
        value = json.loads(literal, strict=False)  # strict=False admits raw newlines
        value.encode("utf-8")  # a lone surrogate (from a \ud800 escape) cannot be typed
    except ValueError:  # UnicodeEncodeError included
        return None
    return value


def format_action(action: Action) -> str:
    """The canonical text of `action`."""
    match action:
        case Click(x, y, ""):
            return f"click({x}, {y})"
        case Click(x, y, target):
            return f"click({_quote(target)}, {x}, {y})"
        case Scroll(dx, dy):
            return f"scroll({dx}, {dy})"
        case TypeText(text):
            return f"type({_quote(text)})"
        case Key(name):
            return f"key({_quote(name)})"
        case Answer(text):
            return f"answer({_quote(text)})"
        case Wait():
            return "wait()"
    raise TypeError(f"not an action: {action!r}")


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def to_pixel(coordinate: int, size: int) -> int:
    """The pixel, on an axis of `size` pixels, that a 0..1000 coordinate points at."""
    return min(coordinate * size // COORDINATE_MAX, size - 1)


def from_pixel(pixel: int, size: int) -> int:
    """A 0..1000 coordinate near pixel `pixel`'s centre that `to_pixel` maps back to
    `pixel` (always possible when the axis has at most 1000 pixels)."""
    first_on_pixel = -(-pixel * COORDINATE_MAX // size)  # ceil(pixel * 1000 / size)
    return max(first_on_pixel, (2 * pixel + 1) * COORDINATE_MAX // (2 * size))
