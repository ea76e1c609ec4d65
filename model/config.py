"""Typed, validated configs.

Field names mirror the LongLLaVA / Jamba ``config.json`` so a real checkpoint's config loads
unchanged. Unknown fields are kept (``extra="allow"``) and written back on save, so a
round trip through this project loses nothing another tool relies on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Counts that multiply the modules a model builds, capped far above any real model (the
# largest LLMs have about 130 layers and 400 experts), so a typo fails at validation
# rather than minutes into building a model.
MAX_LAYERS = 1024
MAX_EXPERTS = 1024


class HybridLMConfig(BaseModel):
    """The Jamba-layout hybrid language model: Mamba-1 mixers, GQA attention without positions, MoE."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())

    vocab_size: int = Field(65536, gt=0)
    hidden_size: int = Field(4096, gt=0)
    intermediate_size: int = Field(14336, gt=0)
    num_hidden_layers: int = Field(32, gt=0, le=MAX_LAYERS)
    num_attention_heads: int = Field(32, gt=0)
    num_key_value_heads: int = Field(8, gt=0)
    hidden_act: Literal["silu"] = "silu"
    rms_norm_eps: float = Field(1e-6, gt=0)
    tie_word_embeddings: bool = False

    num_experts: int = Field(16, gt=0, le=MAX_EXPERTS)
    num_experts_per_tok: int = Field(2, gt=0)
    expert_layer_period: int = Field(2, gt=0)
    expert_layer_offset: int = Field(1, ge=0)
    attn_layer_period: int = Field(8, gt=0)
    attn_layer_offset: int = Field(4, ge=0)

    mamba_d_state: int = Field(16, gt=0)
    mamba_d_conv: int = Field(4, gt=1)
    mamba_expand: int = Field(2, gt=0)
    mamba_dt_rank: int | Literal["auto"] = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_inner_layernorms: bool = True

    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    @model_validator(mode="after")
    def _check_shapes(self) -> "HybridLMConfig":
        if self.attn_layer_offset >= self.attn_layer_period:
            raise ValueError("attn_layer_offset must be smaller than attn_layer_period")
        if self.expert_layer_offset >= self.expert_layer_period:
            raise ValueError("expert_layer_offset must be smaller than expert_layer_period")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok cannot exceed num_experts")
        return self

    # Derived quantities. Properties, not fields, so they never disagree with the fields.
    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.hidden_size / 16) if self.mamba_dt_rank == "auto" else self.mamba_dt_rank

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)

    def is_attention_layer(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    def num_experts_of_layer(self, i: int) -> int:
        return self.num_experts if i % self.expert_layer_period == self.expert_layer_offset else 1

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_attention_layer(i)]

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_attention_layer(i)]


class VisionConfig(BaseModel):
    """The CLIP vision tower's shape, used when the tower is built here rather than loaded."""

    model_config = ConfigDict(extra="allow", frozen=True)

    hidden_size: int = Field(1024, gt=0)
    intermediate_size: int = Field(4096, gt=0)
    num_hidden_layers: int = Field(24, gt=0, le=MAX_LAYERS)
    num_attention_heads: int = Field(16, gt=0)
    image_size: int = Field(336, gt=0)
    patch_size: int = Field(14, gt=0)
    projection_dim: int = Field(768, gt=0)
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class LongLLaVAConfig(HybridLMConfig):
    """The LLM config plus LLaVA's ``mm_*`` fields, as one flat ``config.json``.

    ``mm_vision_tower`` names a local CLIP directory. ``vision_config`` (a project field)
    describes a tower to build from scratch instead, as the embedded default model does.
    ``image_tokens`` (144 or 36) is LongLLaVA's ``resamplePooling="2d"`` grid, 12x12 or 6x6.
    """

    mm_vision_tower: str | None = None
    mm_hidden_size: int = Field(1024, gt=0)
    mm_projector_type: Literal["mlp2x_gelu"] = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: Literal["patch", "cls_patch"] = "patch"
    image_aspect_ratio: Literal["pad", "square"] = "pad"
    image_tokens: Literal[144, 36] = 144
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    vision_config: VisionConfig | None = None
    builtin_tokenizer: Literal["byte"] | None = None  # for models that ship no tokenizer files

    @property
    def image_grid(self) -> int:
        return math.isqrt(self.image_tokens)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "LongLLaVAConfig":
        """The config in ``path``; a bad one raises ValueError with one line per wrong field."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: config.json must hold a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError("; ".join(_describe(error) for error in exc.errors())) from None

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as ``field: message (got value)``, the value cut short."""
    where = ".".join(str(part) for part in error["loc"])
    got = "" if not where else f" (got {str(error['input'])[:40]})"
    return f"{where + ': ' if where else ''}{error['msg']}{got}"
