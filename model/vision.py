"""The vision path: CLIP preprocessing, the CLIP ViT tower, 2D pooling and the projector.

An image becomes ``image_tokens`` rows in the LLM's width: pad to a square with the mean
colour, resize to 336 px (near-equal, cheaper steps for elongated images), run CLIP, take
``hidden_states[-2]`` without CLS (a 24x24 grid), resize that grid bilinearly to 12x12
(144 tokens) or 6x6 (36), and project with Linear-GELU-Linear. This is LongLLaVA's
``resamplePooling="2d"`` path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import LongLLaVAConfig, VisionConfig
from .prompt import as_rgb


def image_size(config: LongLLaVAConfig) -> int:
    """The tower's input size: from ``vision_config``, else that of CLIP ViT-L/14-336."""
    return (config.vision_config or VisionConfig()).image_size


# Both reference steps below can make an intermediate image far larger than the input or
# the output: padding a 1x40000 image gives a 1.6-gigapixel square, and resizing its
# shortest edge to 336 px gives 336x13,440,000. Up to this factor over the larger of the
# input and the output, the exact reference step runs; beyond it, a cheap near-equivalent.
_INTERMEDIATE_FACTOR = 4


def preprocess_image(image: Any, config: LongLLaVAConfig) -> torch.Tensor:
    """A PIL image or uint8 array to normalised ``[3, S, S]`` float32 pixels, as CLIP's processor:
    ``normalise_pixels(fit_image(image, config), config)``."""
    return normalise_pixels(fit_image(image, config), config)


def fit_image(image: Any, config: LongLLaVAConfig) -> np.ndarray:
    """The image as the tower's ``[S, S, 3]`` uint8 square, before normalisation (what a
    trainer that reads each image many times may keep instead of its file).

    "pad" (LongLLaVA's setting) first centres the image on a square of the mean colour;
    both modes then resize the shortest edge to S (bicubic) and centre-crop, which for the
    padded square is a plain resize. For ordinary shapes the pixels are exactly those of
    CLIP's processor; an elongated image takes the shortcuts of ``_pad_to_square`` and
    ``_resize_and_crop``, so that its cost stays within a few times its own or the output's size.
    """
    rgb = as_rgb(image)
    size = image_size(config)
    if config.image_aspect_ratio == "pad":
        rgb = _pad_to_square(rgb, size, tuple(int(m * 255) for m in config.image_mean))
    return np.asarray(_resize_and_crop(rgb, size), dtype=np.uint8)


def normalise_pixels(square: np.ndarray, config: LongLLaVAConfig) -> torch.Tensor:
    """``fit_image``'s uint8 square to ``[3, S, S]`` float32 pixels in CLIP's normalisation."""
    pixels = torch.from_numpy(square.astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def _costly(intermediate_pixels: int, rgb: PILImage.Image, size: int) -> bool:
    return intermediate_pixels > _INTERMEDIATE_FACTOR * max(rgb.width * rgb.height, size * size)


def _pad_to_square(rgb: PILImage.Image, size: int, fill: tuple[int, ...]) -> PILImage.Image:
    """The image centred on a square of ``fill``. When that square would be costly, the
    image is first shrunk so that its long side is ``size``: the square is then the output
    itself, and the picture differs from padding first only in how its edges blend into the fill."""
    width, height = rgb.size
    if width == height:
        return rgb
    side = max(width, height)
    if _costly(side * side, rgb, size):
        rgb = rgb.resize((max(1, round(width * size / side)), max(1, round(height * size / side))), PILImage.BICUBIC)
        width, height, side = *rgb.size, size
    square = PILImage.new("RGB", (side, side), fill)
    square.paste(rgb, ((side - width) // 2, (side - height) // 2))
    return square


def _resize_and_crop(rgb: PILImage.Image, size: int) -> PILImage.Image:
    """CLIP's shortest edge to ``size`` and centre crop. When the resized image would be
    costly, only the window the crop keeps is resampled (Pillow's ``box``: the exact window
    up to the float32 rounding of its corners)."""
    width, height = rgb.size
    short = min(width, height)
    long = int(size * max(width, height) / short)  # transformers' shortest-edge rounding
    resized = (size, long) if width <= height else (long, size)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    if _costly(resized[0] * resized[1], rgb, size):
        sx, sy = width / resized[0], height / resized[1]
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return rgb.resize((size, size), PILImage.BICUBIC, box=box)
    return rgb.resize(resized, PILImage.BICUBIC).crop((left, top, left + size, top + size))


def pool_image_features(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """``[N, P, C]`` features on a row-major square grid to ``[N, tokens, C]`` by bilinear resize.

    ``align_corners=False`` as upstream, so halving the grid side is a 2x2 average. The grid
    is halved step by step while it stays at least the target size (24x24 -> 12x12, as
    LongLLaVA's 144-token pooling, then -> 6x6 for 36 tokens), so every patch contributes
    and 36 tokens are a 4x4 average rather than a sample of a quarter of the patches.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [N, P, C], got shape {tuple(features.shape)}")
    n, p, c = features.shape
    side, out = math.isqrt(p), math.isqrt(max(tokens, 0))
    if side * side != p:
        raise ValueError(f"{p} features per image do not form a square grid (is the CLS token still in?)")
    if tokens < 1 or out * out != tokens or tokens > p:
        raise ValueError(f"tokens must be a square number between 1 and {p}, got {tokens}")
    grid = features.transpose(1, 2).reshape(n, c, side, side)
    while side % 2 == 0 and side // 2 >= out:
        side //= 2
        grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    if side != out:
        grid = F.interpolate(grid, size=(out, out), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class VisionEncoder(nn.Module):
    """The CLIP tower plus LLaVA's feature selection and the 2D pooling: pixels to pooled features."""

    def __init__(self, config: LongLLaVAConfig, tower: CLIPVisionModel | None = None):
        super().__init__()
        if config.mm_vision_select_feature != "patch":
            raise ValueError(
                f"mm_vision_select_feature={config.mm_vision_select_feature!r} keeps the CLS token, "
                "which 2D pooling cannot place on the patch grid; use 'patch'"
            )
        if tower is None:
            if config.vision_config is None:
                raise ValueError("the config has no vision_config to build a tower from; load one with from_directory")
            tower = CLIPVisionModel(CLIPVisionConfig(**config.vision_config.model_dump()))
        if tower.config.hidden_size != config.mm_hidden_size:
            raise ValueError(
                f"the tower's width is {tower.config.hidden_size} but mm_hidden_size is {config.mm_hidden_size}"
            )
        if tower.config.image_size != image_size(config):
            raise ValueError(
                f"the tower takes {tower.config.image_size} px images but the config preprocesses to "
                f"{image_size(config)} px; set vision_config.image_size"
            )
        self.tower = tower
        self.select_layer = config.mm_vision_select_layer
        self.image_tokens = config.image_tokens

    @classmethod
    def from_directory(cls, path: str | Path, config: LongLLaVAConfig) -> "VisionEncoder":
        """A tower from a local CLIP directory (a full CLIP checkpoint works too); never a hub."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP vision tower at {path}: config.json is missing")
        try:
            tower = CLIPVisionModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a CLIP vision tower from {path}: {exc}") from exc
        return cls(config, tower)

    def save_directory(self, path: str | Path) -> None:
        self.tower.save_pretrained(path)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` pixels to ``[N, image_tokens, mm_hidden_size]``."""
        size = self.tower.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [N, 3, {size}, {size}], got {tuple(pixels.shape)}")
        return pool_image_features(self.selected_layer(pixels)[:, 1:], self.image_tokens)  # drop CLS

    def selected_layer(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower's ``hidden_states[select_layer]``, running only the layers up to it:
        LLaVA's -2 never reads the last layer, a quarter of the demo tower's forward."""
        vision = getattr(self.tower, "vision_model", self.tower)  # nested in older transformers
        layers = vision.encoder.layers
        hidden = vision.pre_layrnorm(vision.embeddings(pixels))  # hidden_states[0]
        for layer in layers[: self.select_layer % (len(layers) + 1)]:
            hidden = layer(hidden, None)
        return hidden


class Projector(nn.Sequential):
    """LLaVA's ``mlp2x_gelu``; indices 0 and 2 match the ``mm_projector.{0,2}`` checkpoint keys."""

    def __init__(self, config: LongLLaVAConfig):
        super().__init__(
            nn.Linear(config.mm_hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
