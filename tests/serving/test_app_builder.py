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
    from serving.limits import GRPC_MAX_MESSAGE_ENV

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


def test_a_deployment_refuses_to_start_with_a_grpc_bound_below_its_limits():
    """Serve reads the bound from the environment as a replica's process imports it (here a
    real subprocess, as a replica is): a config whose limits were raised after serve build
    keeps the old bound, and the deployment then fails at start with what to set, not a
    large observation mid-request."""
    from serving.limits import GRPC_MAX_MESSAGE_ENV, Limits

    small = Limits(max_images=1, max_image_pixels=1000, max_body_bytes=2**20)
    script = ("import sys; from serving.limits import Limits, check_grpc_bound; "
              "check_grpc_bound(Limits.model_validate_json(sys.argv[1]))")

    def start(bound: int, limits: Limits) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), GRPC_MAX_MESSAGE_ENV: str(bound)}
        return subprocess.run([sys.executable, "-c", script, limits.model_dump_json()], env=env, capture_output=True, text=True)

    assert start(small.max_message_bytes, small).returncode == 0
    refused = start(small.max_message_bytes, Limits())
    assert refused.returncode != 0
    assert f"set {GRPC_MAX_MESSAGE_ENV} to {2**31 - 1}" in refused.stderr
