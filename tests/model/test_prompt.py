"""The prompt protocol: template strings, image/video/high-res markup, image modes, tiling and pieces."""

import io

import numpy as np
import pytest
from PIL import Image as PILImage

from model.prompt import (
    ASSISTANT_PREFIX,
    IMAGE_TOKEN_INDEX,
    MAX_IMAGE_PIXELS,
    MAX_TILES,
    USER_PREFIX,
    HighResImage,
    Image,
    Text,
    Video,
    as_rgb,
    assistant_turn,
    highres_markup,
    image_markup,
    render_pieces,
    tile_image,
    user_turn,
    video_markup,
)
from model.tokenizer import ByteTokenizer, tokenize_prompt

IMG = "<img><image></img>"


def solid(colour, size=(40, 30)):
    return PILImage.new("RGB", size, colour)


def colours(images):
    return [im.getpixel((0, 0)) for im in images]


def test_template_strings():
    assert user_turn("What is shown?") == "<|startoftext|><|User|>\nWhat is shown?\n"
    assert ASSISTANT_PREFIX == "<|startoftext|><|Assistant|>\n"
    assert assistant_turn("A cat.") == "<|startoftext|><|Assistant|>\nA cat.<|endoftext|>"
    assert image_markup() == IMG


def test_video_markup_keeps_the_last_closing_bracket():
    assert video_markup(1) == f"<vid>{IMG}</vid>"
    assert video_markup(3) == f"<vid>{IMG}<t>{IMG}<t>{IMG}</vid>"
    with pytest.raises(ValueError, match="at least one frame"):
        video_markup(0)


def test_highres_markup_is_global_then_rows():
    assert highres_markup(1, 1) == f"{IMG}\n{IMG}"
    assert highres_markup(2, 3) == f"{IMG}\n{IMG}{IMG}{IMG}\n{IMG}{IMG}{IMG}"
    with pytest.raises(ValueError, match="at least one row"):
        highres_markup(0, 2)


# ---------------------------------------------------------------------------- image modes
def reopened(image: PILImage.Image, fmt: str, **save) -> PILImage.Image:
    """``image`` written as a ``fmt`` file and opened again, lazily, as a user's file would be."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    buffer.seek(0)
    return PILImage.open(buffer)


def pixels(image: PILImage.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = PILImage.new("CMYK", (16, 8), (0, 255, 255, 0))  # red
    cmyk.paste((255, 0, 255, 0), (8, 0, 16, 8))  # green
    jpeg = reopened(cmyk, "JPEG", quality=95)
    assert jpeg.mode == "CMYK"
    rgb = pixels(as_rgb(jpeg))
    assert np.abs(rgb[4, 2] - (255, 0, 0)).max() <= 4 and np.abs(rgb[4, 13] - (0, 255, 0)).max() <= 4


def test_16_bit_png_is_scaled_not_clipped():
    ramp = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    png = reopened(PILImage.fromarray(ramp), "PNG")
    assert png.mode == "I;16"
    expected = np.round(ramp / 257).astype(int)  # 65535 is white, as 255 is in 8 bits
    assert np.array_equal(pixels(as_rgb(png)), np.repeat(expected[..., None], 3, axis=2))
    big_endian = PILImage.frombytes("I;16B", (32, 32), ramp.astype(">u2").tobytes())
    assert np.array_equal(pixels(as_rgb(big_endian))[..., 0], expected)


def test_32_bit_and_float_images_use_pillows_0_to_255_scale():
    ints = PILImage.fromarray(np.array([[-5, 12, 255, 70000]], dtype=np.int32))
    floats = PILImage.fromarray(np.array([[-5.0, 12.4, 12.6, 300.0]], dtype=np.float32))
    assert (ints.mode, floats.mode) == ("I", "F")
    assert pixels(as_rgb(ints))[0, :, 1].tolist() == [0, 12, 255, 255]
    assert pixels(as_rgb(floats))[0, :, 1].tolist() == [0, 12, 12, 255]


@pytest.mark.parametrize("mode, worst", [("YCbCr", 4), ("HSV", 6), ("LAB", 20)])
def test_other_colour_spaces_come_back_to_the_same_rgb(mode, worst):
    """Up to what a round trip through the mode's 8-bit channels loses (8-bit Lab the most)."""
    original = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    converted = PILImage.fromarray(original).convert(mode)
    assert converted.mode == mode
    error = np.abs(pixels(as_rgb(converted)) - original)
    assert error.max() <= worst and error.mean() < 1.5


def over_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:].astype(float) / 255
    return rgba[..., :3] * alpha + 255 * (1 - alpha)


def test_transparency_is_composited_onto_white():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255  # fully transparent and fully opaque
    for image in (rgba, PILImage.fromarray(rgba, "RGBA")):
        rgb = pixels(as_rgb(image))
        assert np.abs(rgb - over_white(rgba)).max() <= 1
        assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == rgba[0, 1, :3].tolist()
    gray_alpha = PILImage.fromarray(rgba[..., [0, 3]], "LA")
    assert np.abs(pixels(as_rgb(gray_alpha))[..., 0] - over_white(rgba[..., [0, 0, 0, 3]])[..., 0]).max() <= 1
    palette = PILImage.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette index 0 is see-through, as in a GIF or PNG
    assert pixels(as_rgb(reopened(palette, "PNG"))).tolist() == [[[255, 255, 255], [40, 50, 60]]]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_corrupt_files_fail_with_the_decoders_reason(fmt):
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(noise).save(buffer, fmt)
    truncated = PILImage.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))
    with pytest.raises(ValueError, match="frame 3: the image cannot be decoded: image file is truncated"):
        as_rgb(truncated, "frame 3")


def test_unconvertible_modes_and_oversized_images_are_refused():
    with pytest.raises(ValueError, match="unsupported image mode 'La'"):
        as_rgb(PILImage.new("La", (2, 2)))
    huge = reopened(PILImage.new("L", (8001, 8000)), "PNG")  # refused from its header, before decoding
    with pytest.raises(ValueError, match=f"8001x8000 pixels is over the limit of {MAX_IMAGE_PIXELS}"):
        as_rgb(huge)


# ---------------------------------------------------------------------------- tiling
def gradient(width, height):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], axis=-1).astype(np.uint8)


def test_tiles_are_white_padded_centred_and_row_major():
    array = gradient(700, 400)
    global_image, tiles, rows, cols = tile_image(array)
    assert (rows, cols, len(tiles)) == (2, 3, 6)
    assert np.array_equal(np.asarray(global_image), array)
    canvas = np.concatenate([np.concatenate([np.asarray(t) for t in tiles[r * 3 : r * 3 + 3]], axis=1) for r in (0, 1)])
    assert canvas.shape == (672, 1008, 3) and all(t.size == (336, 336) for t in tiles)
    top, left = (672 - 400) // 2, (1008 - 700) // 2
    assert np.array_equal(canvas[top : top + 400, left : left + 700], array)
    assert (canvas[:top] == 255).all() and (canvas[top + 400 :] == 255).all()
    assert (canvas[:, :left] == 255).all() and (canvas[:, left + 700 :] == 255).all()


def test_small_image_is_one_tile():
    _, tiles, rows, cols = tile_image(solid((1, 2, 3), (336, 336)))
    assert (rows, cols) == (1, 1) and colours(tiles) == [(1, 2, 3)]


def test_large_image_is_shrunk_to_at_most_max_tiles():
    screenshot = solid((9, 9, 9), (1920, 1080))
    global_image, tiles, rows, cols = tile_image(screenshot)
    assert (rows, cols) == (2, 4)  # 672 px high, 1194 wide: the largest fit of any grid of <= 9
    assert global_image.size == (1920, 1080)
    for size, max_tiles in [((5000, 40), 4), ((40, 5000), 9), ((3000, 3000), 9), ((3000, 3000), 1), ((1000, 999), 2)]:
        _, tiles, rows, cols = tile_image(solid((0, 0, 0), size), max_tiles=max_tiles)
        assert len(tiles) == rows * cols <= max_tiles


def test_tiling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_tiles"):
        tile_image(solid((0, 0, 0)), max_tiles=0)
    with pytest.raises(ValueError, match=f"max_tiles must be between 1 and {MAX_TILES}"):
        tile_image(solid((0, 0, 0)), max_tiles=MAX_TILES + 1)
    with pytest.raises(ValueError, match="tile must be"):
        tile_image(solid((0, 0, 0)), tile=0)
    with pytest.raises(ValueError, match="1x1 tiles of 100000 px is over the limit"):
        tile_image(solid((0, 0, 0), (10, 10)), tile=100_000)  # would be a 10-gigapixel canvas


@pytest.mark.parametrize("size", [(1, 40000), (40000, 1)])
def test_a_sliver_is_tiled_along_its_length(size):
    """Cost stays at max_tiles tiles: the sliver is shrunk to the best grid, 9x1 or 1x9."""
    sliver = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    _, tiles, rows, cols = tile_image(sliver)
    assert (rows, cols) == ((9, 1) if size[0] == 1 else (1, 9)) and len(tiles) == 9
    canvas = np.concatenate([np.asarray(t) for t in tiles], axis=0 if rows == 9 else 1)
    assert (canvas == 0).all(axis=2).sum() == 3024  # one pixel across, 9 tiles long


# ---------------------------------------------------------------------------- pieces
def test_single_image_prompt_and_its_tokens():
    red = solid((255, 0, 0))
    text, images = render_pieces([Text(USER_PREFIX), Image(red), Text("What colour?\n"), Text(ASSISTANT_PREFIX)])
    assert text == f"<|startoftext|><|User|>\n{IMG}What colour?\n<|startoftext|><|Assistant|>\n"
    assert colours(images) == [(255, 0, 0)]
    tok = ByteTokenizer()
    ids = tokenize_prompt(tok, text)
    head = tok.encode("<|startoftext|><|User|>\n<img>")
    assert ids[: len(head)] == head and ids[0] == tok.bos_id
    assert ids[len(head)] == IMAGE_TOKEN_INDEX and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tok.decode([i for i in ids if i != IMAGE_TOKEN_INDEX]) == text.replace("<image>", "")


def test_multiple_images_keep_prompt_order():
    pieces = [Image(solid((1, 0, 0))), Text("then"), Image(np.full((5, 6, 3), 2, np.uint8)), Image(solid((3, 0, 0)))]
    text, images = render_pieces(pieces)
    assert text == f"{IMG}then{IMG}{IMG}"
    assert colours(images) == [(1, 0, 0), (2, 2, 2), (3, 0, 0)]
    assert all(im.mode == "RGB" for im in images)
    ids = tokenize_prompt(ByteTokenizer(), text)
    positions = [k for k, i in enumerate(ids) if i == IMAGE_TOKEN_INDEX]
    assert len(positions) == 3 and positions[2] - positions[1] == len("</img><img>") + 1


def test_video_frames_expand_in_order():
    frames = [solid((k, 0, 0)) for k in range(4)]
    text, images = render_pieces([Text("watch:"), Video(frames), Text("done")])
    assert text == f"watch:<vid>{IMG}<t>{IMG}<t>{IMG}<t>{IMG}</vid>done"
    assert colours(images) == [(k, 0, 0) for k in range(4)]
    _, from_array = render_pieces([Video(np.zeros((2, 8, 8, 3), np.uint8))])
    assert len(from_array) == 2


def test_high_res_image_is_global_then_tiles():
    text, images = render_pieces([HighResImage(gradient(700, 400)), Text("?")])
    assert text == highres_markup(2, 3) + "?"
    assert len(images) == 1 + 6 == text.count("<image>")
    assert images[0].size == (700, 400) and all(im.size == (336, 336) for im in images[1:])
    assert images[1].getpixel((0, 0)) == (255, 255, 255)  # the padding's top-left corner
    text, images = render_pieces([HighResImage(solid((0, 0, 0), (2000, 2000)), max_tiles=4)])
    assert text == highres_markup(2, 2) and len(images) == 5


def test_bad_pieces_raise_clear_errors():
    with pytest.raises(ValueError, match="empty prompt"):
        render_pieces([])
    with pytest.raises(ValueError, match="empty prompt"):
        render_pieces([Text(""), Text("")])
    with pytest.raises(TypeError, match="unknown prompt piece type dict"):
        render_pieces([Text("a"), {"image": None}])
    with pytest.raises(TypeError, match="got a single str"):
        render_pieces("hello")
    with pytest.raises(TypeError, match="text must be a str"):
        render_pieces([Text(b"bytes")])
    with pytest.raises(ValueError, match="pass images as Image pieces"):
        render_pieces([Text("look: <image>")])
    with pytest.raises(ValueError, match="non-empty list"):
        render_pieces([Video([])])
    with pytest.raises(ValueError, match="non-empty list"):
        render_pieces([Video(solid((0, 0, 0)))])
    with pytest.raises(TypeError, match=r"piece 1 \(Image\): image arrays must be uint8"):
        render_pieces([Text("a"), Image(np.zeros((4, 4, 3), np.float32))])
    with pytest.raises(ValueError, match=r"piece 0 \(Video\) frame 1: the image is empty"):
        render_pieces([Video([solid((0, 0, 0)), np.zeros((0, 4, 3), np.uint8)])])
