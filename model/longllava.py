"""LongLLaVA: a CLIP tower, 2D pooling and a projector feeding the hybrid LLM.

Images enter the token stream as rows of projected features spliced in at the
``IMAGE_TOKEN_INDEX`` placeholders that ``tokenize_prompt`` leaves for each ``<image>``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from .config import LongLLaVAConfig
from .llm import HybridLM
from .prompt import IMAGE_TOKEN_INDEX
from .state import DecodeBatch, SessionState
from .vision import Projector, VisionEncoder, preprocess_image


class LongLLaVA(nn.Module):
    def __init__(self, config: LongLLaVAConfig, vision: VisionEncoder | None = None):
        super().__init__()
        self.config = config
        self.llm = HybridLM(config)
        self.vision = vision if vision is not None else VisionEncoder(config)
        self.projector = Projector(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def new_state(self, max_snapshots: int = 64) -> SessionState:
        return self.llm.new_state(max_snapshots)

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> torch.Tensor:
        """PIL images or uint8 arrays to ``[N, image_tokens, hidden]`` LLM-space features."""
        pixels = torch.stack([preprocess_image(im, self.config) for im in images])
        vision_param = next(self.vision.parameters())
        features = self.vision(pixels.to(vision_param.device, vision_param.dtype))
        return self.projector(features.to(self.projector[0].weight.dtype)).to(self.dtype)

    def embed(self, input_ids: Sequence[int] | torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``[L', hidden]`` with each placeholder replaced by one image's rows."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).reshape(-1)
        is_image = ids == IMAGE_TOKEN_INDEX
        n_images = int(is_image.sum())
        n_given = 0 if image_features is None else image_features.shape[0]
        if n_images != n_given:
            raise ValueError(f"the prompt has {n_images} <image> placeholders but {n_given} images were given")
        text = ids[~is_image]
        if text.numel() and (text.min() < 0 or text.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got {text.min()}..{text.max()}")
        text_embeds = self.llm.embed_tokens(text)
        if not n_images:
            return text_embeds
        # cut the text at the placeholders and interleave the image rows
        cuts = torch.nonzero(is_image).flatten().tolist()
        pieces, start, text_pos = [], 0, 0
        for k, pos in enumerate(cuts):
            n_text = pos - start
            pieces += [text_embeds[text_pos : text_pos + n_text], image_features[k]]
            text_pos += n_text
            start = pos + 1
        pieces.append(text_embeds[text_pos:])
        return torch.cat(pieces)

    def prefill(
        self, state: SessionState, embeds: torch.Tensor, logits: Literal["last", "all", "none"] = "last"
    ) -> torch.Tensor | None:
        return self.llm.prefill(state, embeds, logits)

    def decode(self, batch: DecodeBatch, embeds: torch.Tensor) -> torch.Tensor:
        return self.llm.decode(batch, embeds)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.head(hidden)
