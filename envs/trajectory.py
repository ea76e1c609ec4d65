"""Trajectories: one directory per episode, written while it runs, read back by training.

    <out>/episode_000000/
        meta.json     written first with "status": "incomplete"; rewritten at the end
        steps.jsonl   one JSON object per step, appended and flushed as it happens
        000000.png    the screenshot the policy saw at step 0; then 000001.png, ...

meta.json holds "format" (`FORMAT`), "status" ("incomplete" or "complete"), and what the
rollout passes: "episode", "seed", "env_id", "env_kwargs", "policy", "reset_info". When
the episode ends, `finish` adds "length", "return", "success" and "truncated".

A steps.jsonl line:

    {"t": 0, "screenshot": "000000.png", "instruction": "...", "action": "wait()",
     "reward": 0.0, "terminated": false, "truncated": false,
     "info": {... the info that env.step returned ...},
     "model_output": null, "timings": {"act_s": 0.0001, "env_step_s": 0.002, ...}}

A step's screenshot is written before its line, so every line's screenshot exists. An
episode cut short (an exception, KeyboardInterrupt, a killed process) keeps "status":
"incomplete", and `read_trajectory` returns the steps it has (dropping a half-written
last line).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FORMAT = "longllava-trajectory/1"
META, STEPS = "meta.json", "steps.jsonl"


class TrajectoryWriter:
    """Writes one episode into `path`, replacing any earlier episode there."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]):
        self.path = Path(path)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self.meta = {"format": FORMAT, "status": "incomplete", **jsonable(meta)}
        self._write_meta()
        self._steps = open(self.path / STEPS, "w", encoding="utf-8")
        self._t = 0

    def add(
        self,
        observation: dict[str, Any],
        action: str,
        reward: float,
        terminated: bool,
        truncated: bool,
        info: dict[str, Any],
        model_output: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        """Records one step: the observation the action was chosen on, and the outcome."""
        screenshot = f"{self._t:06d}.png"
        Image.fromarray(observation["screenshot"]).save(self.path / screenshot, compress_level=1)
        line = {
            "t": self._t,
            "screenshot": screenshot,
            "instruction": observation["instruction"],
            "action": action,
            "reward": reward,
            "terminated": terminated,
            "truncated": truncated,
            "info": info,
            "model_output": model_output,
            "timings": timings or {},
        }
        self._steps.write(json.dumps(jsonable(line), ensure_ascii=False) + "\n")
        self._steps.flush()
        self._t += 1

    def finish(self, **summary: Any) -> None:
        """Marks the episode complete, with a summary such as its length and return."""
        self.close()
        self.meta.update(status="complete", **jsonable(summary))
        self._write_meta()

    def close(self) -> None:
        """Stops writing; an episode closed without `finish` stays incomplete."""
        self._steps.close()

    def _write_meta(self) -> None:
        temporary = self.path / f"{META}.tmp"
        temporary.write_text(json.dumps(self.meta, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(temporary, self.path / META)  # a reader never sees half a meta.json


@dataclass
class Trajectory:
    path: Path
    meta: dict[str, Any]
    steps: list[dict[str, Any]]

    @property
    def complete(self) -> bool:
        return self.meta["status"] == "complete"

    def screenshot(self, t: int) -> np.ndarray:
        """The screenshot of step t: uint8, (height, width, 3)."""
        with Image.open(self.path / self.steps[t]["screenshot"]) as image:
            return np.array(image.convert("RGB"))


def read_trajectory(path: str | os.PathLike) -> Trajectory:
    path = Path(path)
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} holds format {meta.get('format')!r}, not {FORMAT!r}")
    lines = (path / STEPS).read_text(encoding="utf-8").splitlines()
    steps = []
    for number, line in enumerate(lines):
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1 and meta["status"] != "complete":
                break  # the process died while writing this line
            raise
    return Trajectory(path, meta, steps)


def read_trajectories(root: str | os.PathLike, include_incomplete: bool = False) -> Iterator[Trajectory]:
    """The episodes under `root` in episode order; complete ones only, unless asked."""
    for path in sorted(Path(root).glob("episode_*")):
        trajectory = read_trajectory(path)
        if trajectory.complete or include_incomplete:
            yield trajectory


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars and arrays, and tuples, turned into JSON types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value
