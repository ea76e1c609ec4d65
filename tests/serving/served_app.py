"""What the app tests share: the two applications the ``served`` fixture (``conftest.py``)
starts, their settings, and helpers. (A module of its own: a test importing from
``conftest`` would get whichever conftest the whole suite imported first.)

Two applications run side by side, on the embedded default model:

- ``one``: one model replica, an API key, and small limits, for the round trip, the
  OpenAI client, the remote agent and bad input;
- ``two``: two model replicas sharing a checkpoint store under a memory budget, for
  affinity, failover and load.
"""

from __future__ import annotations

import io
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx2
import numpy as np
from PIL import Image as PILImage

API_KEY = "test-key"
BUDGET = 32 * 2**20  # max_resident_bytes per replica: less than the load test's sessions take
LIMITS = {"max_sessions": 48, "max_text_bytes": 16384, "max_observation_tokens": 8192, "max_image_pixels": 4_000_000}


@dataclass
class App:
    url: str  # the app's root: http://127.0.0.1:<port>/<name>
    name: str
    store: Path  # its checkpoint directory
    replicas: int
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class Served:
    one: App
    two: App
    metrics: str  # Ray's Prometheus endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(seed: int, size=(160, 120)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def metric(served: Served, name: str, app: str) -> dict[str, float]:
    """The latest value of a replica metric, by replica, from Ray's Prometheus endpoint."""
    values = {}
    for line in httpx2.get(served.metrics).text.splitlines():
        if line.startswith(f"ray_{name}{{") and f'application="{app}"' in line:
            replica = re.search(r'replica="([^"]+)"', line).group(1)
            values[replica] = float(line.rsplit(" ", 1)[1])
    return values
