"""A training run's settings: one typed, validated config per run, read from JSON.

Batch sizes follow Hugging Face's convention: ``batch_size`` samples per worker per
micro-batch, ``grad_accum`` micro-batches per optimizer step, so a step sees
``batch_size * grad_accum * num_workers`` samples whatever the number of workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .stages import RECIPES, Part, StageName


class DataSource(BaseModel):
    """A LLaVA-format JSON/JSONL file; ``fraction`` keeps its first share (for replay);
    ``mask_history`` labels only each conversation's last answer, as LLaMA-Factory's
    option of that name does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    fraction: float = Field(1.0, gt=0, le=1)
    image_folder: str | None = None
    mask_history: bool = False


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: StageName
    data: list[DataSource] = Field(min_length=1)
    eval_data: list[DataSource] = []
    output_dir: str

    # where the weights start: a checkpoint directory in the LongLLaVA layout, or, with
    # none, a seeded random model of ``architecture`` (a config.json dict; default: the
    # embedded model's config)
    init: str | None = None
    vision_tower: str | None = None
    tokenizer: str | None = None
    architecture: dict[str, Any] | None = None
    trains: tuple[Part, ...] | None = None  # default: the stage's recipe

    lr: float = Field(2e-5, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)  # PyTorch's and Hugging Face's default; LLM recipes often use 0.95
    max_grad_norm: float | None = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    max_length: int = Field(4096, ge=2)

    eval_every: int = Field(0, ge=0)  # steps; 0: only at the end
    eval_on_start: bool = False  # the eval loss before the first step too (Hugging Face's option of that name)
    save_every: int = Field(0, ge=0)  # steps; 0: only at the end
    log_every: int = Field(1, ge=1)
    seed: int = 0
    bf16: bool = True  # autocast on CUDA; the CPU trains in float32
    gradient_checkpointing: bool = False
    num_workers: int = Field(1, ge=1)  # >1 runs on Ray Train
    device: str | None = None  # default: CUDA if present
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.init is not None and self.architecture is not None:
            raise ValueError("give either init (a checkpoint) or architecture (a random start), not both")
        return self

    @property
    def parts(self) -> tuple[Part, ...]:
        return self.trains if self.trains is not None else RECIPES[self.stage]

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.num_workers

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config is a JSON object")
        return cls.model_validate({**data, **overrides})

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)
