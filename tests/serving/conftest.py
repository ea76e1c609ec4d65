"""The Ray Serve app for the tests: real Ray and Serve on 127.0.0.1, started once per test
session (and only if a test asks for it), real HTTP.

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
import pytest
import torch
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


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    import ray
    from ray import serve

    from serving.application import AppArgs, app

    torch.set_num_threads(1)  # as the replicas: the in-process references then compute the same bits
    metrics = free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, namespace="serve", log_to_driver=False,
             _metrics_export_port=metrics, _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    root = tmp_path_factory.mktemp("served")
    apps = Served(
        one=App(f"http://127.0.0.1:{port}/one", "one", root / "one", 1, API_KEY),
        two=App(f"http://127.0.0.1:{port}/two", "two", root / "two", 2),
        metrics=f"http://127.0.0.1:{metrics}/metrics",
    )
    serve.run(app(AppArgs(checkpoint_dir=str(apps.one.store), api_key=API_KEY, cpus_per_replica=0.5, max_resident_bytes=BUDGET, **LIMITS)),
              name="one", route_prefix="/one")  # returns once the app is running
    serve.run(app(AppArgs(checkpoint_dir=str(apps.two.store), replicas=2, cpus_per_replica=0.5, max_resident_bytes=BUDGET)),
              name="two", route_prefix="/two")
    yield apps
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def reference():
    """The in-process Engine the served outputs are compared with."""
    from serving.engine import Engine

    torch.set_num_threads(1)
    return Engine(device="cpu")


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
