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


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(64 * MiB, ge=1024)  # one request's body
    max_image_bytes: int = Field(16 * MiB, ge=1)  # one PNG or JPEG file
    max_image_pixels: int = Field(16_000_000, ge=1, le=MAX_IMAGE_PIXELS)  # width x height of one image
    max_images: int = Field(64, ge=0)  # images in one observation
    max_text_bytes: int = Field(256 * 1024, ge=1)  # UTF-8 text in one observation or chat request
    max_observation_tokens: int = Field(32768, ge=16)  # what one append adds to the history
    max_new_tokens: int = Field(4096, ge=1, le=8192)  # one generation
    max_sessions: int = Field(4096, ge=1)  # sessions one replica keeps open (created there, not closed)
