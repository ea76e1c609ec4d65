"""Examples to model inputs: token ids, per-position labels, and pixels.

A conversation is LongLLaVA's chat template, turn by turn (``model.prompt``): a user turn
is ``user_turn(text)``, an answer is ``ASSISTANT_PREFIX`` then the answer and EOS. Only
the answers and their EOS are labelled (with ``mask_history``, only the last answer's);
the template, the user's text and every image position carry ``IGNORE_INDEX``. Labels
are laid out on the sequence the model sees, where each ``<image>`` placeholder stands
for ``image_tokens`` positions.

Batches are right-padded: every op of the model is causal, so padding never reaches a
real position, and padded positions carry no label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from model.config import LongLLaVAConfig
from model.prompt import ASSISTANT_PREFIX, EOS_TOKEN, IMAGE_TOKEN_INDEX, user_turn
from model.tokenizer import Tokenizer, tokenize_prompt
from model.vision import preprocess_image

from .data import Example, Skipped

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]  # with IMAGE_TOKEN_INDEX for each image
    labels: list[int]  # one per model position (images expanded), IGNORE_INDEX off the answers

    @property
    def length(self) -> int:
        return len(self.labels)


def encode(example: Example, tokenizer: Tokenizer, image_tokens: int) -> Encoded:
    """Token ids and labels of a whole conversation."""
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, learn: bool) -> None:
        chunk = tokenize_prompt(tokenizer, text)
        ids.extend(chunk)
        for token in chunk:
            if token == IMAGE_TOKEN_INDEX:
                labels.extend([IGNORE_INDEX] * image_tokens)
            else:
                labels.append(token if learn else IGNORE_INDEX)

    last = max((k for k, (role, _) in enumerate(example.turns) if role == "assistant"), default=-1)
    for k, (role, text) in enumerate(example.turns):
        if role == "user":
            add(user_turn(text), learn=False)
        else:
            add(ASSISTANT_PREFIX, learn=False)
            add(text + EOS_TOKEN, learn=k == last or not example.mask_history)
    return Encoded(ids, labels)


@dataclass
class Batch:
    input_ids: list[torch.Tensor]  # per sample, placeholders included
    labels: torch.Tensor  # [batch, L], right-padded with IGNORE_INDEX
    pixels: torch.Tensor  # [images, 3, S, S] for every image of the batch, in order
    images_per_sample: list[int]
    lengths: list[int]  # model positions of each sample
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def tokens(self) -> int:
        """Model positions in the batch, padding excluded."""
        return sum(self.lengths)


class Collator:
    """Turns a list of drawn samples into a ``Batch``; samples over ``max_length``
    positions, and ``Skipped`` ones, are left out and reported in ``Batch.skipped``."""

    def __init__(self, config: LongLLaVAConfig, tokenizer: Tokenizer, max_length: int):
        self.config, self.tokenizer, self.max_length = config, tokenizer, max_length

    def __call__(self, samples: list[Example | Skipped]) -> Batch:
        kept: list[tuple[Encoded, Example]] = []
        skipped = [s for s in samples if isinstance(s, Skipped)]
        for example in (s for s in samples if isinstance(s, Example)):
            encoded = encode(example, self.tokenizer, self.config.image_tokens)
            if encoded.length > self.max_length:
                skipped.append(Skipped(example.id, f"{encoded.length} positions, over max_length={self.max_length}"))
            else:
                kept.append((encoded, example))
        width = max((e.length for e, _ in kept), default=0)
        labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
        for row, (encoded, _) in enumerate(kept):
            labels[row, : encoded.length] = torch.tensor(encoded.labels)
        images = [im for _, example in kept for im in example.images]
        pixels = torch.stack([preprocess_image(im, self.config) for im in images]) if images else torch.empty(0)
        return Batch(
            [torch.tensor(e.input_ids) for e, _ in kept],
            labels,
            pixels,
            [len(example.images) for _, example in kept],
            [e.length for e, _ in kept],
            skipped,
        )
