"""Reading an observation off the wire: a body (msgpack, JSON or multipart) to prompt pieces.

Everything from outside is checked before it costs anything: the body's size first, then
its structure (msgpack is read with bounds on every length and never into anything but
plain values; nothing is ever unpickled), then each image's file size and, from its
header alone, its format and pixel count, so a decompression bomb is refused before a
pixel is decoded. Only then are images decoded, to the RGB arrays the engine takes.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import TypeVar

import msgpack
import numpy as np
from PIL import Image as PILImage
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from model.prompt import Image, Piece, Text, as_rgb, user_message

from .errors import LimitExceededError, MalformedRequestError, UnsupportedMediaError
from .limits import Limits
from .types import AppendRequest, ImagePart, TextPart

Body = TypeVar("Body", bound=AppendRequest)

IMAGE_FORMATS = {"PNG", "JPEG"}
MSGPACK_TYPES = {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused past ``max_body_bytes`` without reading further."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _body_too_large(int(declared), limits)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise _body_too_large(len(body), limits)
    return bytes(body)


def _body_too_large(size: int, limits: Limits) -> LimitExceededError:
    return LimitExceededError(f"the body is {size} bytes, over the limit of {limits.max_body_bytes} (max_body_bytes)")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_append(request: Request, limits: Limits, model: type[Body] = AppendRequest) -> Body:
    """An append's body (or a step's: ``model`` is ``StepRequest``) in any of the three
    encodings, validated but not yet decoded."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        return await _read_form(request, limits, model)
    body = await read_body(request, limits)
    if kind in MSGPACK_TYPES:
        return _validate(model, _unpack(body), python=True)
    if kind == "application/json":
        return _validate(model, body, python=False)
    raise UnsupportedMediaError(
        f"an observation is sent as application/msgpack, application/json or multipart/form-data, not {kind or 'no content type'!r}"
    )


def _unpack(body: bytes) -> object:
    """Plain values only: every length is bounded by the body's (msgpack's default), and
    extension types, which could carry anything, are refused."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedRequestError(f"the body is not valid msgpack: {exc}") from None


def _validate(model: type[Body], data: object, *, python: bool) -> Body:
    try:
        return model.model_validate(data) if python else model.model_validate_json(data)
    except ValidationError as exc:
        raise MalformedRequestError(f"the observation is malformed: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(x) for x in error["loc"]) or "body"
    return f"{where}: {error['msg']} ({len(exc.errors())} problem{'s' if len(exc.errors()) > 1 else ''})"


def form_fields(model: type[AppendRequest]) -> set[str]:
    """The fields a form sends beside its ``text`` and ``image`` parts."""
    return set(model.model_fields) - {"parts"}


async def _read_form(request: Request, limits: Limits, model: type[Body]) -> Body:
    """Parts named ``text`` and ``image`` (files), in prompt order, plus the fields (a
    boolean as ``true``/``false``, an object such as ``sampling`` as JSON)."""
    body = await read_body(request, limits)

    async def chunks():
        yield body

    parser = MultiPartParser(request.headers, chunks(), max_files=limits.max_images + 1, max_fields=1024, max_part_size=limits.max_body_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise MalformedRequestError(f"the multipart body cannot be read: {exc.message}") from None
    parts: list[TextPart | ImagePart] = []
    fields: dict[str, object] = {}
    for name, value in form.multi_items():
        if name == "image" and isinstance(value, UploadFile):
            parts.append(ImagePart(image=await value.read()))
        elif name == "text" and isinstance(value, str):
            parts.append(TextPart(text=value))
        elif name in form_fields(model) and isinstance(value, str):
            fields[name] = _form_value(name, value)
        else:
            raise MalformedRequestError(f"unexpected form part {name!r}: send 'text' fields, 'image' files, and {sorted(form_fields(model))}")
    return _validate(model, {**fields, "parts": [p.model_dump() for p in parts]}, python=True)


def _form_value(name: str, value: str) -> object:
    if value in ("true", "false"):
        return value == "true"
    if not value.lstrip().startswith("{"):
        return value  # a number as text: validation converts it
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise MalformedRequestError(f"form field {name!r} is not valid JSON: {exc}") from None


def to_pieces(request: AppendRequest, limits: Limits) -> list[Piece]:
    """The observation's prompt pieces, every limit checked and every image decoded."""
    check_text(sum(len(p.text.encode("utf-8", "surrogatepass")) for p in request.parts if isinstance(p, TextPart)), limits)
    arrays = iter(decode_images([(p.image, f"part {i}") for i, p in enumerate(request.parts) if isinstance(p, ImagePart)], limits))
    pieces: list[Piece] = [Text(p.text) if isinstance(p, TextPart) else Image(next(arrays)) for p in request.parts]
    return user_message(pieces) if request.user_turn else pieces


def decode_images(files: list[tuple[bytes, str]], limits: Limits) -> list[np.ndarray]:
    """Each ``(data, where)`` file as an RGB array. Every header is read, and the images'
    total size checked, before any pixel is decoded: a request of many small files that
    would decode to gigabytes costs nothing."""
    check_images(len(files), limits)
    opened = [open_image(data, where, limits) for data, where in files]
    check_decoded([image.size for image in opened], limits)
    return [decode(image, where) for image, (_, where) in zip(opened, files)]


def check_images(count: int, limits: Limits) -> None:
    if count > limits.max_images:
        raise LimitExceededError(f"the observation has {count} images, over the limit of {limits.max_images} (max_images)")


def check_decoded(sizes: list[tuple[int, int]], limits: Limits) -> None:
    """Images of these ``(width, height)`` fit in one call to a model replica, which
    takes them decoded, as RGB arrays."""
    size = sum(3 * width * height for width, height in sizes)
    if size > limits.max_decoded_bytes:
        raise LimitExceededError(
            f"the observation's images are {size} bytes decoded, over the {limits.max_decoded_bytes} "
            "one call to a model replica carries (max_images x max_image_pixels x 3, within gRPC's 2 GiB)"
        )


def check_text(size: int, limits: Limits) -> None:
    if size > limits.max_text_bytes:
        raise LimitExceededError(f"the text is {size} bytes, over the limit of {limits.max_text_bytes} (max_text_bytes)")


def open_image(data: bytes, where: str, limits: Limits) -> PILImage.Image:
    """A PNG or JPEG file opened lazily: its size, format and pixel count are checked from
    the header, and no pixel is decoded yet."""
    if len(data) > limits.max_image_bytes:
        raise _image_too_large(where, len(data), limits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        try:
            image = PILImage.open(io.BytesIO(data), formats=sorted(IMAGE_FORMATS))
        except PILImage.DecompressionBombError as exc:
            raise LimitExceededError(f"{where}: {exc}; the limit is {limits.max_image_pixels} pixels (max_image_pixels)") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise MalformedRequestError(f"{where}: not a PNG or JPEG image ({exc})") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise LimitExceededError(
            f"{where}: {width}x{height} is {width * height} pixels, over the limit of {limits.max_image_pixels} (max_image_pixels)"
        )
    return image


def decode(image: PILImage.Image, where: str) -> np.ndarray:
    """An opened image's pixels as an RGB uint8 array."""
    try:
        return np.asarray(as_rgb(image, where))
    except ValueError as exc:  # truncated or corrupt data, found while decoding
        raise MalformedRequestError(str(exc)) from None


def _image_too_large(where: object, size: int | None, limits: Limits) -> LimitExceededError:
    return LimitExceededError(f"image {where}: {size} bytes is over the limit of {limits.max_image_bytes} (max_image_bytes)")
