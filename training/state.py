"""Resumable training state, saved without pickle.

A checkpoint directory is a model in the LongLLaVA layout (``model.checkpoint``), so it
loads anywhere a model does, plus two files for resuming:

    optimizer.safetensors   AdamW's moments and step counts, keyed by parameter name
    trainer_state.json      the optimizer step reached, and the skipped-sample count

The data order is a function of the seed and the step (``training.trainer``), so the
step is all a resumed run needs to draw the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import load_checkpoint, save_checkpoint
from model.longllava import LongLLaVA

OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"


def save_training_state(path: Path, model: LongLLaVA, optimizer: torch.optim.Optimizer, step: int, skipped: int) -> None:
    save_checkpoint(model, path)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"{names[id(p)]}.{key}"] = value.detach().contiguous().cpu()
    save_file(tensors, str(path / OPTIMIZER_FILE))
    (path / STATE_FILE).write_text(json.dumps({"step": step, "skipped": skipped}) + "\n", encoding="utf-8")


def load_training_state(path: Path, model: LongLLaVA, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Loads weights and optimizer state from ``path`` into the live objects; returns
    ``(step, skipped)``."""
    saved = load_checkpoint(path, device=next(model.parameters()).device, dtype=torch.float32)
    model.load_state_dict(saved.state_dict())
    by_parameter: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path / OPTIMIZER_FILE)).items():
        name, field = key.rsplit(".", 1)
        by_parameter.setdefault(name, {})[field] = value
    for name, p in model.named_parameters():
        if name in by_parameter:
            optimizer.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in by_parameter[name].items()}
    meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    return int(meta["step"]), int(meta["skipped"])
