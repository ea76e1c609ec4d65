"""Fixtures for training tests (helpers in training_fixtures.py)."""

from __future__ import annotations

import pytest
from training_fixtures import qa, write_image


@pytest.fixture
def kinds(tmp_path) -> dict[str, dict]:
    """One record of each sample kind, with its images written under tmp_path."""
    img = lambda name, seed, size=(60, 40): write_image(tmp_path / name, seed, size)  # noqa: E731
    return {
        "text": {"conversations": [
            {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"},
            {"from": "human", "value": "Again."}, {"from": "gpt", "value": "hi again"},
        ]},
        "single": qa("<image>\nWhat is this?", "noise", image=img("a.png", 1)),
        "multi": qa("<image><image>\nSame?", "no", image=[img("b.png", 2), img("c.png", 3)]),
        "video": qa("<video>\nHow many frames?", "3", video=[img(f"f{k}.png", 10 + k) for k in range(3)]),
        "tiles": qa("<image>\nRead it.", "ok", image=img("big.png", 4, (200, 100)), tiles=True),
    }
