"""LongLLaVA's prompt protocol: the chat template, image markup, and typed prompt pieces.

Every marker is plain text except ``<|startoftext|>`` and ``<|endoftext|>``, which the
tokenizer maps to the BOS and EOS ids. Each ``<image>`` becomes ``IMAGE_TOKEN_INDEX`` at
tokenisation and one image's projected features at embedding time, so the text and the
image list must always agree in count and order; ``render_pieces`` produces both together.

This module needs only PIL and numpy (no torch), so a remote agent can build prompts too.
Images are checked here, where they enter, so a bad one fails before any session changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image as PILImage

IMAGE_TOKEN_INDEX = -200  # the id that stands for one image in tokenised prompts (LLaVA's value)
IMAGE_PLACEHOLDER = "<image>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

USER_PREFIX = f"{BOS_TOKEN}<|User|>\n"
ASSISTANT_PREFIX = f"{BOS_TOKEN}<|Assistant|>\n"

IMAGE_MARKUP = f"<img>{IMAGE_PLACEHOLDER}</img>"
VIDEO_START, FRAME_SEPARATOR, VIDEO_END = "<vid>", "<t>", "</vid>"

MAX_IMAGE_PIXELS = 64_000_000  # 64 megapixels; larger inputs are refused, not silently shrunk
MAX_TILES = 64  # per high-resolution image; each tile costs as many tokens as an image
WHITE = (255, 255, 255)


# ---------------------------------------------------------------------------- template
def user_turn(text: str) -> str:
    return f"{USER_PREFIX}{text}\n"


def assistant_turn(text: str) -> str:
    """A finished answer, as in history and training labels: it ends with EOS."""
    return f"{ASSISTANT_PREFIX}{text}{EOS_TOKEN}"


def image_markup() -> str:
    return IMAGE_MARKUP


def video_markup(n_frames: int) -> str:
    """``<vid>``, the frames' image markup joined by ``<t>``, ``</vid>``.

    Upstream builds this with ``.rstrip('<t>')``, which strips a character set and so also
    eats the last frame's closing ``>`` (``...</img</vid>``); we emit the intended string.
    """
    if n_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {n_frames}")
    return VIDEO_START + FRAME_SEPARATOR.join([IMAGE_MARKUP] * n_frames) + VIDEO_END


def highres_markup(rows: int, cols: int) -> str:
    """The global image, ``\\n``, then the tiles row by row with ``\\n`` between rows.

    Upstream (cli.py "bestFit") writes a bare ``<image>`` for the global image inside the
    caller's ``<img>...</img>``; we wrap it in ``<img></img>`` like every other image.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"a tile grid needs at least one row and column, got {rows}x{cols}")
    return IMAGE_MARKUP + "\n" + "\n".join([IMAGE_MARKUP * cols] * rows)


# ---------------------------------------------------------------------------- images
def as_rgb(image: Any, name: str = "image") -> PILImage.Image:
    """A PIL image or uint8 array (HxW, HxWx3, HxWx4) as an RGB PIL image, or a clear error.

    Every PIL mode Pillow can convert is accepted: CMYK, YCbCr, LAB and HSV through Pillow's
    conversions; 16-bit grayscale (``I;16``, as 16-bit PNGs open) scaled to 8 bits; 32-bit
    ``I`` and ``F`` on Pillow's own 0-255 scale, clipped. Transparency (an alpha channel,
    HxWx4 arrays included, or a palette's transparent colour) is composited onto white, as
    an image shows on a white page, so what was transparent does not come out as whatever
    colour the hidden pixels hold. The size is checked before the pixels are decoded, so an
    oversized file fails at once; a file that cannot be decoded fails with the decoder's reason.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"{name}: image arrays must be uint8, got {image.dtype}")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(f"{name}: image arrays must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
        height, width = image.shape[:2]
    elif isinstance(image, PILImage.Image):
        width, height = image.size
    else:
        raise TypeError(f"{name}: expected a PIL.Image or a uint8 numpy array, got {type(image).__name__}")
    if width == 0 or height == 0:
        raise ValueError(f"{name}: the image is empty ({width}x{height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name}: {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
    if isinstance(image, np.ndarray):
        image = PILImage.fromarray(np.ascontiguousarray(image))
    try:
        image.load()
    except (OSError, SyntaxError) as exc:  # Pillow's decoders report broken data as either
        raise ValueError(f"{name}: the image cannot be decoded: {exc}") from None
    try:
        return _to_rgb(image)
    except ValueError as exc:
        raise ValueError(f"{name}: unsupported image mode {image.mode!r}: {exc}") from None


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    if image.mode.startswith("I;16"):  # Pillow's own conversion would clip at 255, not scale
        samples = np.asarray(image).astype(np.uint32)
        image = PILImage.fromarray(((samples + 128) // 257).astype(np.uint8))  # 65535 -> 255
    if not image.has_transparency_data:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    page = PILImage.new("RGB", rgba.size, WHITE)
    page.paste(rgba, mask=rgba.getchannel("A"))
    return page


def tile_image(
    image: Any, tile: int = 336, max_tiles: int = 9
) -> tuple[PILImage.Image, list[PILImage.Image], int, int]:
    """Split an image into ``tile``-pixel squares for high-resolution input (upstream "bestFit").

    An image that needs more than ``max_tiles`` tiles is first shrunk, aspect ratio kept, to
    the largest size that fits some grid of at most ``max_tiles``. It is then centred on a
    white canvas of whole tiles (upstream pads ``diff // 2`` on both sides and so comes up a
    pixel short on odd differences; we pad to exactly whole tiles) and cut row-major.
    Returns ``(global_image, tiles, rows, cols)``; the global image is the unshrunk input.
    The canvas is held to ``MAX_IMAGE_PIXELS`` like any image, so its cost is bounded by
    ``max_tiles`` (at most ``MAX_TILES``) and ``tile``, whatever the input's shape.
    """
    if tile < 1:
        raise ValueError(f"tile must be a positive pixel size, got {tile}")
    if not 1 <= max_tiles <= MAX_TILES:
        raise ValueError(f"max_tiles must be between 1 and {MAX_TILES}, got {max_tiles}")
    original = as_rgb(image)
    width, height = original.size
    if math.ceil(width / tile) * math.ceil(height / tile) > max_tiles:
        # for each grid of at most max_tiles, the largest fitting size; keep the largest of those
        fits = []
        for r in range(1, max_tiles + 1):
            c = max_tiles // r
            if r * width <= c * height:  # the height binds
                fits.append((width * r * tile // height, r * tile))
            else:
                fits.append((c * tile, height * c * tile // width))
        fits = [(max(w, 1), max(h, 1)) for w, h in fits]  # a sliver keeps one pixel across
        resized = original.resize(max(fits, key=lambda size: size[0] * size[1]), PILImage.BICUBIC)
    else:
        resized = original
    width, height = resized.size
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    if rows * cols * tile * tile > MAX_IMAGE_PIXELS:
        raise ValueError(f"{rows}x{cols} tiles of {tile} px is over the limit of {MAX_IMAGE_PIXELS} pixels")
    canvas = PILImage.new("RGB", (cols * tile, rows * tile), WHITE)
    canvas.paste(resized, ((cols * tile - width) // 2, (rows * tile - height) // 2))
    boxes = [(c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(rows) for c in range(cols)]
    tiles = [canvas.crop(box) for box in boxes]
    return original, tiles, rows, cols


# ---------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Image:
    image: Any  # PIL.Image or uint8 array


@dataclass(frozen=True)
class Video:
    frames: Sequence[Any]


@dataclass(frozen=True)
class HighResImage:
    """One image seen whole and as ``tile``-pixel tiles (at most ``max_tiles``)."""

    image: Any
    tile: int = 336
    max_tiles: int = 9


Piece = Text | Image | Video | HighResImage


def render_pieces(pieces: Sequence[Piece]) -> tuple[str, list[PILImage.Image]]:
    """The marker text and the flat list of RGB images in prompt order, each image checked."""
    if isinstance(pieces, (str, Text, Image, Video, HighResImage)):
        raise TypeError(f"pieces must be a list of prompt pieces, got a single {type(pieces).__name__}")
    text: list[str] = []
    images: list[PILImage.Image] = []
    for i, piece in enumerate(pieces):
        where = f"piece {i} ({type(piece).__name__})"
        if isinstance(piece, Text):
            if not isinstance(piece.text, str):
                raise TypeError(f"{where}: text must be a str, got {type(piece.text).__name__}")
            if IMAGE_PLACEHOLDER in piece.text:
                raise ValueError(f"{where}: text holds the {IMAGE_PLACEHOLDER!r} marker; pass images as Image pieces")
            text.append(piece.text)
        elif isinstance(piece, Image):
            images.append(as_rgb(piece.image, where))
            text.append(IMAGE_MARKUP)
        elif isinstance(piece, Video):
            frames = piece.frames
            lone_image = isinstance(frames, (str, bytes, PILImage.Image)) or (
                isinstance(frames, np.ndarray) and frames.ndim != 4
            )
            if lone_image or not len(frames):  # a lone image would iterate as rows
                raise ValueError(f"{where}: frames must be a non-empty list of images or a TxHxWxC array")
            images += [as_rgb(frame, f"{where} frame {j}") for j, frame in enumerate(frames)]
            text.append(video_markup(len(frames)))
        elif isinstance(piece, HighResImage):
            global_image, tiles, rows, cols = tile_image(as_rgb(piece.image, where), piece.tile, piece.max_tiles)
            images += [global_image, *tiles]
            text.append(highres_markup(rows, cols))
        else:
            raise TypeError(
                f"piece {i}: unknown prompt piece type {type(piece).__name__}; "
                "expected Text, Image, Video or HighResImage"
            )
    rendered = "".join(text)
    if not rendered:
        raise ValueError("empty prompt: the pieces hold no text and no images")
    return rendered, images


def user_message(pieces: Sequence[Piece]) -> list[Piece]:
    """A user turn around ``pieces``, ending with the assistant prefix so that generation
    answers it: ``user_turn`` for mixed text and images."""
    return [Text(USER_PREFIX), *pieces, Text("\n" + ASSISTANT_PREFIX)]
