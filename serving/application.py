"""The Ray Serve application: ``serve run serving.app [key=value ...]``.

``app`` is an application builder: Serve validates its ``key=value`` arguments (or a
config file's ``args:``) into ``AppArgs`` and calls it. It binds two deployments:

- ``ModelReplica`` (``serving.replica``), ``replicas`` of them, each an Engine over the one
  checkpoint store, with ``gpus_per_replica`` GPUs (on the CPU when 0). Serve routes each
  request to a replica by consistent hashing of the session id (Ray's
  ``ConsistentHashRouter``), with no fallback to another replica under load: a request
  waits for its session's replica rather than move the session (any replica could take it
  over from the store, but moving costs a restore, and back again another).
- ``Ingress`` (``serving.http``), the FastAPI app that authenticates and decodes requests.

With no arguments it serves the embedded default model on the CPU, one replica, sessions
in ``./longllava-sessions``; Ray and Serve listen on 127.0.0.1 only.

(No ``from __future__ import annotations`` here: Serve reads the builder's annotation as
a class to know that its arguments are an ``AppArgs``.)
"""

import logging
import os
from pathlib import Path

import ray
from pydantic import Field
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from .access import API_KEY_ENV, SECRET_ENV, new_secret
from .chat import MODEL_NAME
from .http import Ingress, api
from .limits import GRPC_MAX_MESSAGE_ENV, Limits
from .replica import ModelReplica, ReplicaSettings

log = logging.getLogger(__name__)
CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": every Ray socket on 127.0.0.1


class AppArgs(Limits):
    """The app's arguments; the limits (``serving.limits.Limits``) are arguments too."""

    model: str | None = None  # a local LongLLaVA checkpoint directory; None: the embedded default model
    vision_tower: str | None = None  # a local CLIP directory, if the checkpoint does not name one
    tokenizer: str | None = None  # a local tokenizer, if not the checkpoint's own
    model_name: str = MODEL_NAME  # the name OpenAI clients ask for
    replicas: int = Field(1, ge=1)
    gpus_per_replica: float = Field(0.0, ge=0.0)  # each replica's num_gpus; 0 runs on the CPU
    cpus_per_replica: float = Field(1.0, ge=0.0)  # each replica's num_cpus
    torch_threads: int | None = Field(None, ge=1)  # default: cpus_per_replica, at least 1
    checkpoint_dir: str = "longllava-sessions"  # a directory every replica reaches, or an fsspec URL
    max_resident_bytes: int | None = Field(None, ge=0)  # per replica; past it idle sessions go to the store
    rollback_window: int = Field(16, ge=0)  # steps of Mamba snapshots kept in memory per session (older: from the log)
    api_key: str | None = None  # default: $LONGLLAVA_API_KEY; without either, no key is asked for
    session_secret: str | None = None  # signs session tokens; default: $LONGLLAVA_SESSION_SECRET, else random
    max_ongoing_requests: int = Field(64, ge=1)  # per model replica
    failover_timeout_s: float = Field(60.0, gt=0.0)  # how long the ingress re-sends to a dead replica's successor

    def limits(self) -> Limits:
        return Limits(**{name: getattr(self, name) for name in Limits.model_fields})

    def replica_settings(self) -> ReplicaSettings:
        return ReplicaSettings(
            model=self.model, vision_tower=self.vision_tower, tokenizer=self.tokenizer,
            checkpoint_dir=_absolute(self.checkpoint_dir), max_resident_bytes=self.max_resident_bytes,
            rollback_window=self.rollback_window,
            device="cuda" if self.gpus_per_replica > 0 else "cpu",
            torch_threads=self.torch_threads or max(1, int(self.cpus_per_replica)),
            max_ongoing_requests=self.max_ongoing_requests, limits=self.limits(),
        )


def app(args: AppArgs) -> Application:
    if not ray.is_initialized() and "RAY_ADDRESS" not in os.environ:
        _keep_ray_on_loopback()
    secret = args.session_secret or os.environ.get(SECRET_ENV)
    if secret is None:
        log.warning("no session_secret (or $%s): session tokens last until the app is deployed again", SECRET_ENV)
        secret = new_secret()
    # the ingress sends the model replica each observation's images decoded: over 4 MiB for one 1920x1080 screenshot
    grpc = {"runtime_env": {"env_vars": {GRPC_MAX_MESSAGE_ENV: str(args.limits().max_message_bytes)}}}
    model = serve.deployment(ModelReplica).options(
        name="ModelReplica",
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica, **grpc},
        request_router_config=RequestRouterConfig(
            request_router_class=CONSISTENT_HASH_ROUTER,
            # the names ConsistentHashRouter.initialize_state reads (with .get(): a typo is ignored)
            request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 0},
        ),
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=30.0,  # lets the checkpoint writer finish what is queued
    )
    ingress = serve.deployment(serve.ingress(api)(Ingress)).options(
        name="Ingress", ray_actor_options={"num_cpus": 0, **grpc}, max_ongoing_requests=1024,
    )
    return ingress.bind(
        model.bind(args.replica_settings()), args.limits(), secret, args.api_key or os.environ.get(API_KEY_ENV),
        args.model_name, args.failover_timeout_s,
    )


def _keep_ray_on_loopback() -> None:
    """``serve run`` builds the app before it starts Ray: make that Ray listen on 127.0.0.1.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported, which the CLI did
    before calling us; so besides setting it for the processes Ray will start, set the
    constant it was read into. (Serve 2.60 replicas still open their inter-deployment gRPC
    port on every interface, whatever this says: see docs/architecture.md.)
    """
    from ray._private import ray_constants

    os.environ.setdefault(LOOPBACK_ONLY, "0")
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[LOOPBACK_ONLY] != "0"


def _absolute(path: str) -> str:
    """A local directory as an absolute path (replicas do not share the caller's working directory)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())
