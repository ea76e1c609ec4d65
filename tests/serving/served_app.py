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
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2
import numpy as np
from PIL import Image as PILImage

API_KEY = "test-key"
# max_resident_bytes per replica: less than the load test's sessions take on either app. A
# session of the embedded model holds about 1.5 MB (its Mamba states and 16 snapshots of them),
# so 32 sessions on two replicas take about 23 MB each
BUDGET = 16 * 2**20
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


def replica_actor(app: App, replica: str):
    import ray

    return ray.get_actor(f"SERVE_REPLICA::{app.name}#ModelReplica#{replica}", namespace="serve")


def replica_states(app: App) -> dict[str, int]:
    from ray import serve

    return serve.status().applications[app.name].deployments["ModelReplica"].replica_states


def kill(app: App, replica: str) -> None:
    """Kill the model replica actor named ``replica``, as a crash would."""
    import ray

    assert replica_states(app).get("RUNNING") == app.replicas
    ray.kill(replica_actor(app, replica), no_restart=True)


def wait_for_replicas(app: App, timeout_s: float = 120.0) -> None:
    """Until Serve has replaced the killed replica, so that the next kill leaves one standing."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if replica_states(app) == {"RUNNING": app.replicas}:
            return
        time.sleep(0.5)
    raise TimeoutError("Serve did not replace the killed replica")


def wait_until_busy(app: App, replica: str) -> None:
    """Until ``replica`` is working on a request (Serve's own count of them)."""
    import ray

    actor = replica_actor(app, replica)
    while ray.get(actor.get_num_ongoing_requests.remote()) == 0:
        time.sleep(0.01)
