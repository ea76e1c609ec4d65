"""The app's builder as Ray Serve's command line sees it: ``serve build serving:app``
writes a config that names the builder (so ``serve run serve.yaml`` calls it with the
config's ``args:``), with the replicas routed by session and gRPC's message bound raised
on both deployments; a misspelt argument is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]


def test_serve_build_writes_a_config_that_names_the_builder(tmp_path):
    from serving.application import GRPC_MAX_MESSAGE_ENV

    out = tmp_path / "serve.yaml"
    serve = Path(sys.executable).with_name("serve")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([str(serve), "build", "serving:app", "-o", str(out)], check=True, cwd=tmp_path, env=env, capture_output=True)
    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["import_path"] == "serving:app"
    deployments = {d["name"]: d for d in app["deployments"]}
    model = deployments["ModelReplica"]
    assert model["num_replicas"] == 1 and model["ray_actor_options"]["num_gpus"] == 0
    router = model["request_router_config"]
    assert router["request_router_class"].endswith("consistent_hash_router:ConsistentHashRouter")
    assert router["request_router_kwargs"] == {"num_virtual_nodes": 100, "num_fallback_replicas": 0}
    for name in ("ModelReplica", "Ingress"):  # gRPC's bound between them, at both ends: 2 GiB at the default limits
        assert deployments[name]["ray_actor_options"]["runtime_env"]["env_vars"] == {GRPC_MAX_MESSAGE_ENV: str(2**31 - 1)}


def test_the_builder_takes_typed_arguments():
    import serving
    from serving.application import AppArgs

    assert serving.app.__name__ == "app"  # outside `serve build`, the builder itself
    args = AppArgs.model_validate({"replicas": "2", "gpus_per_replica": "0.5", "max_sessions": "10"})
    assert (args.replicas, args.gpus_per_replica, args.limits().max_sessions) == (2, 0.5, 10)
    with pytest.raises(ValidationError, match="replica"):
        AppArgs.model_validate({"replica": "2"})  # misspelt: refused, not ignored
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"replicas": "0"})
