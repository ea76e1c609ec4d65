"""The vision path: preprocessing, feature selection, 2D pooling, the projector, tower loading."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from model.config import LongLLaVAConfig, VisionConfig
from model.vision import Projector, VisionEncoder, pool_image_features, preprocess_image

ROOT = pathlib.Path(__file__).parents[2]
TINY_TOWER = VisionConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
)


def config(**kw) -> LongLLaVAConfig:
    base = dict(
        vocab_size=300, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
        mm_hidden_size=32, vision_config=TINY_TOWER,
    )
    return LongLLaVAConfig(**(base | kw))


def normalised(rgb, cfg):
    return [(c / 255 - m) / s for c, m, s in zip(rgb, cfg.image_mean, cfg.image_std)]


# ---------------------------------------------------------------------------- preprocessing
def test_pad_centres_the_image_on_the_mean_colour_and_normalises():
    cfg = config()
    red = Image.new("RGB", (200, 100), (255, 0, 0))  # wide: bands of 50 px above and below
    pixels = preprocess_image(red, cfg)
    assert pixels.shape == (3, 336, 336) and pixels.dtype == torch.float32
    mean_colour = normalised((122, 116, 104), cfg)  # int(m * 255) of CLIP's mean
    for y in (0, 40, 300, 335):  # inside the bands, away from the edge the resize blurs
        torch.testing.assert_close(pixels[:, y, 168], torch.tensor(mean_colour), atol=1e-5, rtol=0)
    for y, x in [(168, 0), (168, 168), (100, 335), (236, 5)]:
        torch.testing.assert_close(pixels[:, y, x], torch.tensor(normalised((255, 0, 0), cfg)), atol=1e-5, rtol=0)


CLIP = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def padded_then_clip(array: np.ndarray) -> torch.Tensor:
    """The reference: LLaVA's pad (centred on a square of the mean colour), then CLIP's processor."""
    height, width = array.shape[:2]
    side = max(width, height)
    square = Image.new("RGB", (side, side), (122, 116, 104))
    square.paste(Image.fromarray(array), ((side - width) // 2, (side - height) // 2))
    return CLIP(square, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("height, width", [(150, 260), (260, 150), (1080, 1920), (2340, 1080), (40, 150), (17, 11)])
def test_pad_matches_clip_image_processor(height, width):
    """Wide, tall, screen and phone shapes, large and small: the exact reference pixels."""
    array = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess_image(array, config()), padded_then_clip(array), atol=1e-5, rtol=0)


@pytest.mark.parametrize("height, width", [(3000, 30), (30, 3000), (900, 7)])
def test_elongated_images_come_close_to_the_exact_reference(height, width):
    """Past 4:1 the image is shrunk before it is padded; only its edges' blend differs."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=-1).astype(np.uint8)
    error = (preprocess_image(array, config()) - padded_then_clip(array)).abs()
    assert error.mean() < 0.01 and (error > 0.1).float().mean() < 0.01


def test_square_mode_on_a_sliver_resamples_only_its_centre():
    cfg = config(image_aspect_ratio="square")
    block = np.zeros((900, 7, 3), dtype=np.uint8)
    block[446:453] = 255  # a white 7x7 square in the middle of a black sliver
    noise = np.random.default_rng(0).integers(0, 256, (7, 900, 3), dtype=np.uint8)
    for sliver in (block, noise):
        expected = CLIP(Image.fromarray(sliver), return_tensors="pt")["pixel_values"][0]  # 336x43200 on the way
        error = (preprocess_image(sliver, cfg) - expected).abs()
        assert error.mean() < 0.01 and (error > 0.1).float().mean() < 0.01


def test_elongated_images_cost_what_their_output_does():
    """1x40000 took 6.2 GB and 32 s when padded first (18 GB in square mode); now a few MB."""
    script = """
import resource, numpy as np
from model.config import LongLLaVAConfig
from model.vision import preprocess_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for mode in ("pad", "square"):
    for shape in ((40000, 1, 3), (1, 40000, 3)):
        pixels = preprocess_image(np.full(shape, 255, np.uint8), LongLLaVAConfig(image_aspect_ratio=mode))
        assert pixels.shape == (3, 336, 336)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * (1 if sys.platform == "darwin" else 1024))
"""
    done = subprocess.run([sys.executable, "-c", "import sys\n" + script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 200 * 2**20  # peak RSS growth, with a wide margin


def test_square_mode_crops_the_centre_like_clip():
    cfg = config(image_aspect_ratio="square")
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((0, 255, 0), (100, 0, 200, 100))  # the middle third is green
    pixels = preprocess_image(image, cfg)
    torch.testing.assert_close(pixels, CLIP(image, return_tensors="pt")["pixel_values"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[:, 10, 10], torch.tensor(normalised((0, 255, 0), cfg)), atol=1e-5, rtol=0)


def test_grayscale_rgba_and_palette_inputs_become_rgb():
    cfg = config()
    gray = np.full((336, 336), 200, dtype=np.uint8)
    rgba = np.zeros((336, 336, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 20, 30), 0  # fully transparent: composited onto white
    expected_gray = torch.tensor(normalised((200, 200, 200), cfg)).view(3, 1, 1).expand(3, 336, 336)
    torch.testing.assert_close(preprocess_image(gray, cfg), expected_gray, atol=1e-5, rtol=0)
    torch.testing.assert_close(preprocess_image(rgba, cfg)[:, 5, 5], torch.tensor(normalised((255, 255, 255), cfg)), atol=1e-5, rtol=0)
    palette = Image.new("RGB", (336, 336), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    pixel = preprocess_image(palette, cfg)[:, 5, 5]
    torch.testing.assert_close(pixel, torch.tensor(normalised((10, 20, 30), cfg)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "image, error, match",
    [
        (np.zeros((10, 10, 3), dtype=np.float32), TypeError, "uint8"),
        (np.zeros((10, 10, 3), dtype=np.uint16), TypeError, "uint8"),
        (np.zeros((10, 10, 2), dtype=np.uint8), ValueError, "HxW, HxWx3"),
        (np.zeros((2, 10, 10, 3), dtype=np.uint8), ValueError, "HxW, HxWx3"),
        (np.zeros((0, 10, 3), dtype=np.uint8), ValueError, "empty"),
        (Image.new("RGB", (0, 5)), ValueError, "empty"),
        (Image.new("La", (5, 5)), ValueError, "mode 'La'"),
        (np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (8001, 8000, 3)), ValueError, "over the limit"),
        (torch.zeros(3, 10, 10), TypeError, "PIL.Image or a uint8 numpy array"),
        ("cat.png", TypeError, "got str"),
    ],
)
def test_bad_images_are_rejected_clearly(image, error, match):
    with pytest.raises(error, match=match):
        preprocess_image(image, config())


# ---------------------------------------------------------------------------- pooling
def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """1D bilinear weights with align_corners=False, written from the definition."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(x), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        w[i, lo] += 1 - (x - lo)
        w[i, hi] += x - lo
    return w


@pytest.mark.parametrize("p, tokens, steps", [(576, 144, [12]), (144, 36, [6]), (576, 36, [12, 6]), (576, 576, [24]), (576, 25, [12, 6, 5])])
def test_pooling_counts_and_explicit_bilinear_reference(p, tokens, steps):
    features = torch.randn(3, p, 5, dtype=torch.float64)
    pooled = pool_image_features(features, tokens)
    assert pooled.shape == (3, tokens, 5)
    side = int(p**0.5)
    w = torch.eye(side, dtype=torch.float64)
    for out in steps:  # the grid is halved step by step, then resized to the target
        w = bilinear_matrix(w.shape[0], out) @ w
    grid = features.view(3, side, side, 5)  # row-major: patch k sits at (k // side, k % side)
    expected = torch.einsum("ry,cx,nyxd->nrcd", w, w, grid).reshape(3, tokens, 5)
    torch.testing.assert_close(pooled, expected)


def test_36_tokens_average_every_4x4_patch_block():
    features = torch.randn(2, 576, 3)
    grid = features.transpose(1, 2).reshape(2, 3, 24, 24)
    expected = F.avg_pool2d(grid, 4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_image_features(features, 36), expected)


def test_halving_the_grid_is_2x2_average_pooling():
    features = torch.randn(2, 576, 7)
    pooled = pool_image_features(features, 144)
    grid = features.transpose(1, 2).reshape(2, 7, 24, 24)
    expected = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled, expected)


def test_pooling_keeps_rows_and_columns_apart():
    rows = torch.arange(24.0).repeat_interleave(24)  # patch k's row
    features = torch.stack([rows, torch.arange(24.0).repeat(24)], dim=-1)[None]  # [1, 576, (row, col)]
    pooled = pool_image_features(features, 144)[0].view(12, 12, 2)
    assert torch.equal(pooled[3, 7], torch.tensor([6.5, 14.5]))


@pytest.mark.parametrize(
    "shape, tokens, match",
    [
        ((1, 577, 4), 144, "square grid"),
        ((1, 576, 4), 140, "square number"),
        ((1, 144, 4), 576, "square number"),
        ((576, 4), 144, r"\[N, P, C\]"),
    ],
)
def test_pooling_rejects_bad_shapes(shape, tokens, match):
    with pytest.raises(ValueError, match=match):
        pool_image_features(torch.zeros(shape), tokens)


# ---------------------------------------------------------------------------- encoder and projector
@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return VisionEncoder(config()).eval()


def test_encoder_selects_layer_minus_2_without_cls(encoder):
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        features = encoder(pixels)
        # independent check: a one-layer tower with the same weights ends where layer -2 is
        short = CLIPVisionModel(CLIPVisionConfig(**TINY_TOWER.model_copy(update={"num_hidden_layers": 1}).model_dump()))
        short.load_state_dict(encoder.tower.state_dict(), strict=False)
        patches = short(pixel_values=pixels).last_hidden_state[:, 1:]
    assert patches.shape == (2, 576, 32) and features.shape == (2, 144, 32)
    torch.testing.assert_close(features, pool_image_features(patches, 144))


def test_36_token_encoder_pools_through_the_144_token_grid(encoder):
    enc36 = VisionEncoder(config(image_tokens=36), tower=encoder.tower).eval()
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        hidden = encoder.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(enc36(pixels), pool_image_features(pool_image_features(hidden, 144), 36))


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1])
def test_the_selected_layer_equals_the_towers_hidden_state_and_skips_the_layers_after_it(encoder, select_layer):
    enc = VisionEncoder(config(mm_vision_select_layer=select_layer), tower=encoder.tower)
    pixels = torch.randn(2, 3, 336, 336)
    expected = encoder.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
    assert torch.equal(enc.selected_layer(pixels), expected)
    enc.tower.zero_grad(set_to_none=True)
    enc(pixels).sum().backward()
    layers = getattr(enc.tower, "vision_model", enc.tower).encoder.layers
    used = select_layer % (len(layers) + 1)
    assert all(p.grad is None for layer in layers[used:] for p in layer.parameters())
    assert all(p.grad is not None for layer in layers[:used] for p in layer.parameters())


def test_encoder_rejects_bad_configs_and_pixels(encoder):
    with pytest.raises(ValueError, match="CLS token"):
        VisionEncoder(config(mm_vision_select_feature="cls_patch"))
    with pytest.raises(ValueError, match="mm_hidden_size"):
        VisionEncoder(config(mm_hidden_size=64))
    with pytest.raises(ValueError, match="no vision_config"):
        VisionEncoder(config(vision_config=None))
    with pytest.raises(ValueError, match=r"\[N, 3, 336, 336\]"):
        encoder(torch.zeros(1, 3, 224, 224))


def test_projector_is_mlp2x_gelu_with_checkpoint_keys():
    cfg = config()
    projector = Projector(cfg)
    assert list(projector.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert projector[0].weight.shape == (48, 32) and projector[2].weight.shape == (48, 48)
    x = torch.randn(4, 144, 32)
    expected = projector[2](F.gelu(projector[0](x)))
    torch.testing.assert_close(projector(x), expected)


def test_tower_round_trips_through_a_local_directory(encoder, tmp_path):
    encoder.save_directory(tmp_path / "tower")
    loaded = VisionEncoder.from_directory(tmp_path / "tower", config()).eval()
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), encoder(pixels))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        VisionEncoder.from_directory(tmp_path / "nowhere", config())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load a CLIP vision tower"):
        VisionEncoder.from_directory(tmp_path / "broken", config())


def test_a_full_clip_directory_loads_its_vision_half(tmp_path):
    """LongLLaVA's tower directory is a whole CLIP checkpoint (text and vision)."""
    torch.manual_seed(1)
    text = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=64, bos_token_id=0, eos_token_id=1,
    )
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_TOWER.model_dump(), projection_dim=8)).eval()
    clip.save_pretrained(tmp_path)
    loaded = VisionEncoder.from_directory(tmp_path, config(vision_config=None)).eval()
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(loaded(pixels), pool_image_features(hidden, 144))
