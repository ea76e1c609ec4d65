"""A scripted baseline for MiniWoB++ button tasks (click-test, click-test-2, click-button).

It reads the page from `info["dom"]` (privileged state that `envs.miniwob_adapter`
exposes, never shown to a model), finds the button the utterance names, and clicks its
centre in the grammar's 0..1000 coordinates. A policy for the rollout's `--agent scripted`.
"""

from __future__ import annotations

import re
from typing import Any

import gymnasium as gym

from envs.actions import Click, Wait, format_action, from_pixel
from envs.policies import Decision


class ScriptedPolicy:
    def __init__(self, *, env_id: str, action_space: gym.Space):
        pass

    def reset(self, seed: int | None = None) -> None:
        pass

    def act(self, observation: dict[str, Any], info: dict[str, Any]) -> Decision:
        button = named_button(observation["instruction"], info.get("dom", ()))
        if button is None:
            return Decision(format_action(Wait()))
        height, width = observation["screenshot"].shape[:2]
        x = from_pixel(int(button["left"] + button["width"] / 2), width)
        y = from_pixel(int(button["top"] + button["height"] / 2), height)
        return Decision(format_action(Click(x, y)))


def named_button(utterance: str, dom: tuple[dict[str, Any], ...]) -> dict[str, Any] | None:
    """The button whose text the utterance names as a word, or the only button."""
    buttons = [e for e in dom if e["tag"].lower() == "button"]
    named = [b for b in buttons if b["text"] and re.search(rf"\b{re.escape(b['text'])}\b", utterance)]
    if named:
        return named[0]
    return buttons[0] if len(buttons) == 1 else None
