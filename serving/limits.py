"""What the Ray Serve app refuses: the bounds on one request and on one replica.

Each is checked where it is cheapest, before the work it protects: body and image sizes
as the ingress reads a request (an image's pixel count from its header, before any pixel
is decoded), an observation's tokens in the engine before a single image is encoded,
open sessions in the replica before a session is created. Going over one is a 4xx that
names the limit and its value; nothing changes on the server.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from model.prompt import MAX_IMAGE_PIXELS

MiB = 2**20
GRPC_MAX_MESSAGE = 2**31 - 1  # gRPC's message lengths are signed 32-bit
# The most one gRPC message between deployments may hold (a replica's server receiving a request,
# its caller's channel a reply); 4 MiB by default, read when a replica's process imports Serve
GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(64 * MiB, ge=1024, le=256 * MiB)  # one request's body (4x it must fit in a gRPC message)
    max_image_bytes: int = Field(16 * MiB, ge=1)  # one PNG or JPEG file
    max_image_pixels: int = Field(16_000_000, ge=1, le=MAX_IMAGE_PIXELS)  # width x height of one image
    max_images: int = Field(64, ge=0)  # images in one observation
    max_text_bytes: int = Field(256 * 1024, ge=1)  # UTF-8 text in one observation or chat request
    max_observation_tokens: int = Field(32768, ge=16)  # what one append adds to the history
    max_new_tokens: int = Field(4096, ge=1, le=8192)  # one generation
    max_sessions: int = Field(4096, ge=1)  # sessions one replica keeps open (created there, not closed)

    @property
    def max_decoded_bytes(self) -> int:
        """An observation's images decoded to RGB, at most: ``max_images`` at ``max_image_pixels``,
        unless that would not fit in one gRPC message beside the rest of the call."""
        return min(self.max_images * self.max_image_pixels * 3, GRPC_MAX_MESSAGE - self._max_rest_bytes)

    @property
    def max_message_bytes(self) -> int:
        """The largest gRPC message between the ingress and a model replica: an append, which
        carries its images decoded (replies are far smaller: a whole generation, 0.5 MiB)."""
        return self.max_decoded_bytes + self._max_rest_bytes

    @property
    def _max_rest_bytes(self) -> int:
        """An append but its decoded images: its pieces pickle to under 4x the body (the worst
        found, 3.6x: a chat of empty user turns, 16 bytes of JSON each, 57 pickled); plus
        gRPC's default 4 MiB, for the call's metadata and so that no limit lowers the bound."""
        return 4 * self.max_body_bytes + 4 * MiB


def check_grpc_bound(limits: Limits) -> None:
    """Refuses to start a deployment whose process bounds gRPC messages below what ``limits``
    let one call carry; otherwise a large observation would fail mid-request (a 500). The
    app's builder sets the bound from the limits; a config file whose limits were raised
    after ``serve build`` still holds the old bound in its ``runtime_env``."""
    from ray.serve._private.constants import RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH as bound

    if bound < limits.max_message_bytes:
        raise ValueError(
            f"this deployment's gRPC messages are bounded at {bound} bytes (${GRPC_MAX_MESSAGE_ENV}), under the "
            f"{limits.max_message_bytes} its limits need; set {GRPC_MAX_MESSAGE_ENV} to {limits.max_message_bytes} in "
            "the deployment's runtime_env, or write the config again with serve build"
        )
