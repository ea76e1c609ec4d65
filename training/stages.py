"""Stage recipes: what each of LongLLaVA's training stages trains and what it freezes.

    stage       data                                         trains
    text        text-only SFT                                 llm
    align       image-caption pairs                          projector
    single      single-image instructions                    projector, llm
    multi       multi-image and video instructions, with     projector, llm
                replay of single-image and text data and
                tiled high-resolution images
    trajectory  recorded agent episodes (envs.rollout), the  projector, llm
                loss on the actions only

The vision tower stays frozen in every stage, as in LongLLaVA, whose CLIP is pretrained.
A run's config can change what trains with ``trains``: the embedded demo model, whose
tower is pretrained on its own and whose LLM starts random, trains the LLM during
alignment and freezes the projector during trajectory fine-tuning (``training.pipeline``).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

Part = Literal["vision", "projector", "llm"]
StageName = Literal["text", "align", "single", "multi", "trajectory"]
PARTS: tuple[Part, ...] = ("vision", "projector", "llm")

RECIPES: dict[StageName, tuple[Part, ...]] = {
    "text": ("llm",),
    "align": ("projector",),
    "single": ("projector", "llm"),
    "multi": ("projector", "llm"),
    "trajectory": ("projector", "llm"),
}


def freeze_for(model: nn.Module, trains: tuple[Part, ...]) -> None:
    """Set ``requires_grad`` on every parameter: True exactly in the parts that train."""
    unknown = set(trains) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; expected some of {PARTS}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.split(".", 1)[0] in trains)
