"""Input processing: an observation's pieces to token ids and embeddings.

Everything that can refuse an observation happens here, before any session changes, and
in order of cost: render and check the pieces, tokenise, count the tokens the images will
take (and refuse an oversized observation before encoding a single image), digest the
content (a re-sent step is recognised without encoding it), and only then run the
vision tower and the embedding.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image as PILImage

from model.longllava import LongLLaVA
from model.prompt import IMAGE_TOKEN_INDEX, Piece, Text, render_pieces
from model.tokenizer import Tokenizer, tokenize_prompt

from .steps import content_digest


@dataclass
class Observation:
    """A rendered, counted observation; ``embed`` encodes it."""

    ids: list[int]  # token ids, with IMAGE_TOKEN_INDEX where each image goes
    images: list[PILImage.Image]
    tokens: int  # what it adds to the history: text tokens plus image_tokens per image
    digest: bytes

    def history_ids(self, image_tokens: int) -> array:
        """The ids as they lie in the history: one IMAGE_TOKEN_INDEX per image row."""
        out = array("i")
        for t in self.ids:
            out.extend([t] * image_tokens if t == IMAGE_TOKEN_INDEX else (t,))
        return out


class InputProcessor:
    def __init__(self, model: LongLLaVA, tokenizer: Tokenizer, max_chunk_tokens: int):
        self.model, self.tokenizer, self.max_chunk_tokens = model, tokenizer, max_chunk_tokens

    def process(self, pieces: Sequence[Piece] | str) -> Observation:
        """Render, tokenise, count and digest; raises before any image is encoded."""
        if isinstance(pieces, str):
            pieces = [Text(pieces)]
        text, images = render_pieces(pieces)
        ids = tokenize_prompt(self.tokenizer, text)
        tokens = len(ids) + len(images) * (self.model.config.image_tokens - 1)
        if tokens > self.max_chunk_tokens:
            raise ValueError(
                f"this append is {tokens} tokens ({len(images)} images), over the engine's "
                f"max_chunk_tokens={self.max_chunk_tokens}"
            )
        return Observation(ids, images, tokens, content_digest(text, images))

    @torch.no_grad()
    def embed(self, observation: Observation) -> torch.Tensor:
        features = self.model.encode_images(observation.images) if observation.images else None
        return self.model.embed(observation.ids, features)
