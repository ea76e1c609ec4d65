"""Typed actions and the text grammar the model writes them in.

    click(x, y)      x, y: integers in 0..1000, relative to the screenshot's width and
                     height (UI-TARS v1, CogAgent, OS-Atlas), so a coordinate means the same
                     spot at any screen size; env adapters convert it to pixels
    click("name", x, y)  the same click, naming what it means to hit before the point
    type("text")     type into the focused field
    scroll(dx, dy)   integers in -1000..1000; positive dy scrolls down, positive dx right
    key("name")      press a key: key("Enter"), key("ctrl+a")
    wait()           do nothing this step
    answer("text")   give the final answer

String arguments are JSON string literals. The grammar's one truth is envs/actions.py
(agent/ must not import envs, which imports agent for `--agent model`): the same names,
bounds and canonical text, checked over every action kind by tests/agent. `to_text`
writes the canonical form, so an environment accepts every `Action`.

Model output is read leniently by `parse_action`: the first call anywhere in the text
counts (after "Action:", inside prose, verb in any case). Output with no valid call never
raises; it becomes `FALLBACK` (`wait()`, which does nothing on any screen) with the
reason in `ParsedAction.error`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

COORDINATE_MAX = 1000  # as envs.actions
SCROLL_MAX = 1000  # as envs.actions: a screen's span; a larger number is a runaway, not a scroll


def _encodable(text: str) -> str:
    """Lone surrogates (from a \\ud800 escape) cannot be typed, recorded or sent as UTF-8."""
    text.encode("utf-8")  # UnicodeEncodeError is a ValueError, which pydantic reports
    return text


Coordinate = Annotated[int, Field(ge=0, le=COORDINATE_MAX)]
ScrollAmount = Annotated[int, Field(ge=-SCROLL_MAX, le=SCROLL_MAX)]
UnicodeText = Annotated[str, AfterValidator(_encodable)]


class _Action(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    def to_text(self) -> str:
        """The canonical grammar text, as the environments read it."""
        args = (json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v)
                for k, v in self if k != "kind")
        return f"{self.kind}({', '.join(args)})"


class Click(_Action):
    kind: Literal["click"] = "click"
    x: Coordinate
    y: Coordinate
    target: UnicodeText = ""  # what it means to hit; the text names it first: click("Save", 264, 802)

    def to_text(self) -> str:
        point = f"{self.x}, {self.y}"
        return f"click({json.dumps(self.target, ensure_ascii=False)}, {point})" if self.target else f"click({point})"


class TypeText(_Action):
    kind: Literal["type"] = "type"
    text: UnicodeText


class Scroll(_Action):
    kind: Literal["scroll"] = "scroll"
    dx: ScrollAmount
    dy: ScrollAmount


class Key(_Action):
    kind: Literal["key"] = "key"
    name: Annotated[UnicodeText, Field(min_length=1)]


class Wait(_Action):
    kind: Literal["wait"] = "wait"


class Answer(_Action):
    kind: Literal["answer"] = "answer"
    text: UnicodeText


Action = Annotated[Click | TypeText | Scroll | Key | Wait | Answer, Field(discriminator="kind")]
ACTION = TypeAdapter(Action)  # validates an action from a dict or JSON, e.g. off the wire
FALLBACK = Wait()

GRAMMAR_HELP = (
    "Reply with one action: click(x, y) with x and y from 0 to 1000 across the screenshot's "
    'width and height, or click("name", x, y) naming what it clicks, type("text"), scroll(dx, dy), '
    'key("name"), wait(), or answer("text").'
)


def format_action(action: Action) -> str:
    return action.to_text()


class ParsedAction(BaseModel):
    """What a model's text was read as. `ok` is False when `action` is the fallback."""

    model_config = ConfigDict(frozen=True)

    action: Action
    raw: str
    ok: bool
    error: str | None = None


# One alternative per argument shape. Each attempt starting at a verb scans only up to the
# next unescaped quote or non-digit, so the search stays linear on adversarial text.
_CALL = re.compile(
    r"\b(?:"
    r"(?P<pair>click|scroll)\s*\(\s*(?P<a>[+-]?[0-9]+)\s*,\s*(?P<b>[+-]?[0-9]+)\s*\)"
    r'|(?P<named>click)\s*\(\s*(?P<target>"(?:[^"\\]|\\.)*+")\s*,\s*(?P<x>[+-]?[0-9]+)\s*,\s*(?P<y>[+-]?[0-9]+)\s*\)'
    r'|(?P<one>type|key|answer)\s*\(\s*(?P<string>"(?:[^"\\]|\\.)*+")\s*\)'
    r"|(?P<none>wait)\s*\(\s*\)"
    r")",
    re.IGNORECASE | re.DOTALL,
)
_MAX_DIGITS = 9  # beyond any valid value; also keeps int() clear of Python's digit limit


def parse_action(text: str) -> ParsedAction:
    """The first grammar call in `text`, validated; never raises on any string."""
    call = _CALL.search(text)
    if call is None:
        return ParsedAction(action=FALLBACK, raw=text, ok=False, error="no action call found")
    try:
        action = ACTION.validate_python(_fields(call))
    except ValidationError as error:  # out of range, an empty key name, a lone surrogate
        reason = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in error.errors())
    except ValueError as error:  # a bad JSON escape, an oversized number
        reason = str(error)
    else:
        return ParsedAction(action=action, raw=text, ok=True)
    return ParsedAction(action=FALLBACK, raw=text, ok=False, error=f"{call[0][:80]!r}: {reason}")


def _fields(call: re.Match[str]) -> dict[str, object]:
    if call["pair"]:
        kind = call["pair"].lower()
        a, b = (_integer(call[g]) for g in ("a", "b"))
        return {"kind": kind, **({"x": a, "y": b} if kind == "click" else {"dx": a, "dy": b})}
    if call["named"]:
        target = json.loads(call["target"], strict=False)
        if not target:
            raise ValueError('click("", x, y) names no target: write click(x, y)')
        return {"kind": "click", "target": target, "x": _integer(call["x"]), "y": _integer(call["y"])}
    if call["one"]:
        kind = call["one"].lower()
        value = json.loads(call["string"], strict=False)  # strict=False admits raw newlines, as envs does
        return {"kind": kind, "name" if kind == "key" else "text": value}
    return {"kind": "wait"}


def _integer(digits: str) -> int:
    if len(digits.lstrip("+-")) > _MAX_DIGITS:
        raise ValueError(f"number {digits[:12]}… has more than {_MAX_DIGITS} digits")
    return int(digits)
