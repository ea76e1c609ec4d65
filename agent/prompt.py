"""One agent step as LongLLaVA prompt pieces.

A session's history is one chat: each step is a user turn holding the new screenshot
(`<img><image></img>`) and its text, then the model's reply. The task instruction comes
once, in the first turn, and never again: the session already holds it. Training on
recorded trajectories should build its prompts with this function, so a fine-tuned model
sees the layout it will be run with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.prompt import EOS_TOKEN, Image, Piece, Text, user_message


@dataclass(frozen=True)
class Observation:
    """What the agent sees at one step: a screenshot (PIL image or uint8 HxWx3 array)
    and any text that comes with it."""

    screenshot: Any
    text: str = ""


def step_pieces(observation: Observation, instruction: str | None = None, close_turn: bool = False) -> list[Piece]:
    """The user turn for one step. `instruction` is given on the first step only;
    `close_turn` ends the previous reply with EOS when generation stopped short of it
    (at max_new_tokens), so every reply in the history is a whole assistant turn."""
    body: list[Piece] = [Text(instruction + "\n")] if instruction else []
    body.append(Image(observation.screenshot))
    if observation.text:
        body.append(Text("\n" + observation.text))
    turn = user_message(body)
    return [Text(EOS_TOKEN), *turn] if close_turn else turn
