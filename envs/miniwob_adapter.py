"""MiniWoB++ tasks seen through the project's observations and action grammar.

Importing `envs` with the `miniwob` package installed registers every
"miniwob/<task>-v<n>" again as "longllava-miniwob/<task>-v<n>", made by `MiniWoBScreenEnv`:

    env = gymnasium.make("longllava-miniwob/click-test-2-v1")

Observation: {"screenshot": uint8 (210, 160, 3) for most tasks, "instruction": the
task's utterance}. Actions are grammar strings, mapped onto MiniWoB's action dicts:

    click(x, y)     CLICK_COORDS on the pixel that (x, y) points at
    type("text")    TYPE_TEXT into the focused element
    key("name")     PRESS_KEY: a character, or a WebDriver key name without brackets
                    (Enter, Tab, Backspace, Escape, ArrowUp, PageDown, ...), after
                    optional "ctrl+", "shift+", "alt+", "meta+" prefixes
    scroll(dx, dy)  one wheel step at the screen centre: down if dy > 0, up if dy < 0;
                    MiniWoB has no horizontal scrolling, so dx is ignored
    wait()          NONE

MiniWoB tasks are solved by acting, so `answer(...)` is unsupported. A malformed or
unsupported action does nothing (NONE) and `info["action_error"]` says why. Rewards
are MiniWoB's own (positive on success, scaled down by the time taken);
`info["is_success"]` is set when the task ends. `info["dom"]` lists the page's elements
as plain dicts (tag, text, id, classes, value, and left/top/width/height in screenshot
pixels): privileged state for scripted baselines, never for a model.

Episodes are cut at `MAX_EPISODE_STEPS`. MiniWoB runs on a real-time clock, so its
episodes are only as deterministic as the browser is.

Needs Debian's `chromium` and `chromium-driver`. Their paths are handed to miniwob
(MINIWOB_CHROME_BINARY / MINIWOB_CHROMEDRIVER, unless already set), so Selenium never
tries to download a driver.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces
from miniwob.action import ActionSpaceConfig, ActionTypes
from miniwob.constants import ALL_POSSIBLE_KEYS, WEBDRIVER_SPECIAL_KEYS

from envs.actions import Action, Click, Key, Scroll, TypeText, Wait, parse_action, to_pixel
from envs.spaces import ActionText, Unicode, uniform_click

NAMESPACE = "longllava-miniwob"
MAX_EPISODE_STEPS = 30

ACTION_TYPES = (
    ActionTypes.NONE,
    ActionTypes.CLICK_COORDS,
    ActionTypes.TYPE_TEXT,
    ActionTypes.PRESS_KEY,
    ActionTypes.SCROLL_UP_COORDS,
    ActionTypes.SCROLL_DOWN_COORDS,
)
# In the order miniwob writes them: "A-C-M-S-<key>".
MODIFIERS = {"alt": "A-", "ctrl": "C-", "meta": "M-", "shift": "S-"}
SPECIAL_KEYS = {name[1:-1].lower(): name for name in WEBDRIVER_SPECIAL_KEYS}
KEY_INDEX = {key: i for i, key in enumerate(ALL_POSSIBLE_KEYS)}


def register_miniwob_tasks() -> None:
    """Registers "longllava-miniwob/<task>-v<n>" for every "miniwob/<task>-v<n>"."""
    import miniwob  # noqa: F401  (registers the miniwob/ ids)

    for spec in list(gymnasium.registry.values()):
        if spec.namespace == "miniwob":
            gymnasium.register(
                id=f"{NAMESPACE}/{spec.name}-v{spec.version}",
                entry_point="envs.miniwob_adapter:MiniWoBScreenEnv",
                kwargs={"miniwob_id": spec.id},
                nondeterministic=spec.nondeterministic,
                max_episode_steps=MAX_EPISODE_STEPS,
            )


class MiniWoBScreenEnv(gymnasium.Env[dict[str, Any], str]):
    """The MiniWoB++ task `miniwob_id` (e.g. "miniwob/click-test-2-v1") in a headless
    Chromium, seen and driven as the module docstring describes."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": None}

    def __init__(self, miniwob_id: str, render_mode: str | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}")
        _point_miniwob_at_debian_chromium()
        self.render_mode = render_mode
        self._config = ActionSpaceConfig(action_types=ACTION_TYPES, allowed_keys=ALL_POSSIBLE_KEYS)
        self._web = gymnasium.make(miniwob_id, action_space_config=self._config, disable_env_checker=True).unwrapped
        self.width, self.height = self._web.instance.task_width, self._web.instance.task_height
        self.observation_space = spaces.Dict(
            {
                "screenshot": spaces.Box(0, 255, (self.height, self.width, 3), np.uint8),
                "instruction": Unicode(),
            }
        )
        self.action_space = ActionText(uniform_click)
        self._screenshot = np.zeros((self.height, self.width, 3), np.uint8)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        # MiniWoB seeds its page's Math.random per episode; derive that seed from ours.
        web_obs, _ = self._web.reset(seed=int(self.np_random.integers(2**31)))
        return self._observation(web_obs), {"dom": _dom(web_obs)}

    def step(self, action: str):
        web_action, error = self._web_action(parse_action(action), action)
        web_obs, reward, terminated, truncated, _ = self._web.step(web_action)
        info: dict[str, Any] = {"dom": _dom(web_obs), "action_error": error}
        if terminated:
            info["is_success"] = reward > 0
        return self._observation(web_obs), float(reward), terminated, truncated, info

    def render(self) -> np.ndarray | None:
        return self._screenshot.copy() if self.render_mode == "rgb_array" else None

    def close(self) -> None:
        if self._web is not None:
            self._web.close()
            self._web = None

    def _observation(self, web_obs: dict[str, Any]) -> dict[str, Any]:
        self._screenshot = np.array(web_obs["screenshot"], dtype=np.uint8)
        return {"screenshot": self._screenshot.copy(), "instruction": web_obs["utterance"]}

    def _web_action(self, action: Action | None, text: str) -> tuple[dict[str, Any], str]:
        """MiniWoB's action dict for `action`, and the action error ("" if none)."""
        match action:
            case Click(x, y):
                coords = [to_pixel(x, self.width), to_pixel(y, self.height)]
                return self._make(ActionTypes.CLICK_COORDS, coords=np.array(coords, np.float32)), ""
            case TypeText(typed):
                return self._make(ActionTypes.TYPE_TEXT, text=typed), ""
            case Key(name):
                key = _miniwob_key(name)
                if key is None:
                    return self._make(ActionTypes.NONE), f"unknown key {name!r}"
                return self._make(ActionTypes.PRESS_KEY, key=KEY_INDEX[key]), ""
            case Scroll(_, dy) if dy != 0:
                kind = ActionTypes.SCROLL_DOWN_COORDS if dy > 0 else ActionTypes.SCROLL_UP_COORDS
                return self._make(kind, coords=np.array([self.width / 2, self.height / 2], np.float32)), ""
            case Scroll() | Wait():
                return self._make(ActionTypes.NONE), ""
            case None:
                return self._make(ActionTypes.NONE), f"not an action in the grammar: {str(text)[:200]!r}"
        return self._make(ActionTypes.NONE), f"{type(action).__name__.lower()} is not supported on MiniWoB"

    def _make(self, kind: ActionTypes, **fields: Any) -> dict[str, Any]:
        return {"action_type": ACTION_TYPES.index(kind), **fields}


def _miniwob_key(name: str) -> str | None:
    """"ctrl+shift+Enter" -> "C-S-<Enter>", or None if miniwob cannot press it."""
    prefixes, key = set(), name
    while "+" in key[:-1]:  # a trailing "+" is the plus key itself
        modifier, key = key.split("+", 1)
        if modifier.lower() not in MODIFIERS:
            return None
        prefixes.add(MODIFIERS[modifier.lower()])
    key = key if len(key) == 1 else SPECIAL_KEYS.get(key.lower())
    if key is None:
        return None
    combo = "".join(p for p in MODIFIERS.values() if p in prefixes) + key
    return combo if combo in KEY_INDEX else None


def _dom(web_obs: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    return tuple(
        {
            "ref": int(e["ref"]),
            "parent": int(e["parent"]),
            "tag": e["tag"],
            "text": e["text"],
            "value": e["value"],
            "id": e["id"],
            "classes": e["classes"],
            **{side: float(e[side][0]) for side in ("left", "top", "width", "height")},
        }
        for e in web_obs["dom_elements"]
    )


def _point_miniwob_at_debian_chromium() -> None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    unset = not os.environ.get("MINIWOB_CHROME_BINARY") and not os.environ.get("MINIWOB_CHROMEDRIVER")
    if unset and chromium and driver:
        os.environ["MINIWOB_CHROME_BINARY"], os.environ["MINIWOB_CHROMEDRIVER"] = chromium, driver
