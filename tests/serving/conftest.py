"""The Ray Serve app for the tests: real Ray and Serve on 127.0.0.1, started once per test
session (and only if a test asks for it), real HTTP. The apps are described in
``served_app.py``."""

from __future__ import annotations

import pytest
import torch

from served_app import API_KEY, BUDGET, LIMITS, App, Served, free_port


@pytest.fixture(scope="session")
def served(tmp_path_factory, local_ray) -> Served:
    from ray import serve

    from serving.application import AppArgs, app

    torch.set_num_threads(1)  # as the replicas: the in-process references then compute the same bits
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    root = tmp_path_factory.mktemp("served")
    apps = Served(
        one=App(f"http://127.0.0.1:{port}/one", "one", root / "one", 1, API_KEY),
        two=App(f"http://127.0.0.1:{port}/two", "two", root / "two", 2),
        metrics=local_ray,
    )
    serve.run(app(AppArgs(checkpoint_dir=str(apps.one.store), api_key=API_KEY, cpus_per_replica=0.5, max_resident_bytes=BUDGET, **LIMITS)),
              name="one", route_prefix="/one")  # returns once the app is running
    serve.run(app(AppArgs(checkpoint_dir=str(apps.two.store), replicas=2, cpus_per_replica=0.5, max_resident_bytes=BUDGET)),
              name="two", route_prefix="/two")
    yield apps
    serve.shutdown()


@pytest.fixture(scope="session")
def reference():
    """The in-process Engine the served outputs are compared with."""
    from serving.engine import Engine

    torch.set_num_threads(1)
    return Engine(device="cpu")
