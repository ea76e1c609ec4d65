"""Load and save LongLLaVA checkpoints in the Hugging Face layout.

A checkpoint directory holds ``config.json`` and the weights as ``model.safetensors`` or as
shards plus ``model.safetensors.index.json``, under LongLLaVA's key names:
``model.embed_tokens``, ``model.layers.{i}.mamba.*``, ``model.layers.{i}.moe.router``,
``model.layers.{i}.moe.experts.{j}.{gate,up,down}_proj``, ``model.final_layernorm``,
``lm_head``, ``model.mm_projector.{0,2}``. The CLIP tower lives in its own local directory
(``mm_vision_tower`` in the config, relative to the checkpoint or absolute); as in
LongLLaVA, tower weights inside the checkpoint are ignored.

Weights are read with safetensors straight onto the target device; a model is first built
on the meta device, so a 53B checkpoint never exists twice in memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LongLLaVAConfig
from .longllava import LongLLaVA
from .vision import VisionEncoder

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOWER_DIR = "vision_tower"

# (this project's prefix, LongLLaVA's prefix); lookups try the longest prefix first
_PREFIXES = [
    ("llm.lm_head.", "lm_head."),
    ("projector.", "model.mm_projector."),
    ("llm.", "model."),
]
# LongLLaVA loads its tower from mm_vision_tower and ignores tower weights in the checkpoint
_IGNORED = "model.vision_tower."
TIED_HEAD = "llm.lm_head.weight"  # absent from the files when tie_word_embeddings is set
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.moe\.experts\.(\d+)\.")

Stored = dict[str, tuple[str, tuple[int, ...]]]  # stored key -> (its shard's file name, its shape)


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, corrupt or of another model."""


def to_longllava_key(key: str) -> str:
    for ours, theirs in sorted(_PREFIXES, key=lambda p: -len(p[0])):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(f"no LongLLaVA name for parameter {key!r}")


def from_longllava_key(key: str) -> str | None:
    for ours, theirs in sorted(_PREFIXES, key=lambda p: -len(p[1])):
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


# ---------------------------------------------------------------------------- reading
def _weight_files(path: Path) -> dict[str, list[str]]:
    """Shard file name -> the keys it holds, from the index or the single file."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object")
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            if not isinstance(name, str) or Path(name).name != name:
                raise CheckpointError(f"{index}: shard name {name!r} must be a plain file name")
            files.setdefault(name, []).append(key)
        return files
    if (path / SINGLE_NAME).exists():
        return {SINGLE_NAME: []}  # keys come from the file itself
    raise CheckpointError(f"{path} holds neither {INDEX_NAME} nor {SINGLE_NAME}")


def _stored_shapes(path: Path) -> Stored:
    """Each stored key's shard and shape, from the safetensors headers: no tensor data is read."""
    stored: Stored = {}
    for name, expected in _weight_files(path).items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"shard {file} named by the index is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
                if expected and set(expected) != set(keys):
                    raise CheckpointError(f"shard {file} does not hold the keys its index lists")
                stored.update({key: (name, tuple(f.get_slice(key).get_shape())) for key in keys})
        except SafetensorError as exc:
            raise CheckpointError(f"shard {file} is not a readable safetensors file: {exc}") from None
    return stored


def _check_structure(path: Path, config: LongLLaVAConfig, keys: list[str]) -> None:
    """The config's layer and expert counts against the stored key names.

    This runs before a model is built: the layers a config asks for are built first, so a
    config saying 100000 layers over a 9-layer checkpoint took minutes and gigabytes to
    reach the missing-parameter error. Every layer stores its feed-forward as experts
    (a dense one as ``experts.0``).
    """
    layers = {int(m[1]) for key in keys if (m := _LAYER_KEY.match(key))}
    if layers != set(range(config.num_hidden_layers)):
        held = f"{len(layers)} (numbered {min(layers)} to {max(layers)})" if layers else "none"
        raise CheckpointError(f"{path}: config.json says {config.num_hidden_layers} layers, but the weights hold {held}")
    experts: dict[int, set[int]] = {}
    for key in keys:
        if m := _EXPERT_KEY.match(key):
            experts.setdefault(int(m[1]), set()).add(int(m[2]))
    for i in sorted(layers):
        want, held = config.num_experts_of_layer(i), experts.get(i, set())
        if held != set(range(want)):
            raise CheckpointError(f"{path}: config.json gives layer {i} {want} experts, but the weights hold {len(held)}")


def _read_tensors(path: Path, stored: Stored, device: torch.device | str) -> dict[str, torch.Tensor]:
    by_shard: dict[str, list[str]] = {}
    for key, (shard, _) in stored.items():
        by_shard.setdefault(shard, []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for shard, keys in by_shard.items():
        try:
            with safe_open(str(path / shard), framework="pt", device=str(device)) as f:
                tensors.update({key: f.get_tensor(key) for key in keys})
        except SafetensorError as exc:
            raise CheckpointError(f"shard {path / shard} is not a readable safetensors file: {exc}") from None
    return tensors


def _resolve_tower(path: Path, config: LongLLaVAConfig, vision_tower_path: str | Path | None) -> Path | None:
    where = vision_tower_path or config.mm_vision_tower
    if where is None:
        return None
    tower = Path(where)
    return tower if tower.is_absolute() else path / tower


def load_checkpoint(
    path: str | Path,
    vision_tower_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> LongLLaVA:
    """A ``LongLLaVA`` with every parameter from ``path`` (and the tower's directory).

    Cheap checks come first, so a checkpoint that cannot fit its config fails in
    milliseconds: the layer and expert counts against the stored names, then every name
    and shape against a model built on the meta device. Tensor data is read last.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        config = LongLLaVAConfig.from_json_file(path / "config.json")
    except ValueError as exc:
        raise CheckpointError(f"{path / 'config.json'} is not a valid LongLLaVA config: {exc}") from None
    stored = {key: value for key, value in _stored_shapes(path).items() if not key.startswith(_IGNORED)}
    if config.tie_word_embeddings:  # a copy of the tied embedding, if a writer kept one
        stored.pop(to_longllava_key(TIED_HEAD), None)
    _check_structure(path, config, list(stored))

    tower_dir = _resolve_tower(path, config, vision_tower_path)
    if tower_dir is None:
        raise CheckpointError(f"{path}: no vision tower (set mm_vision_tower in config.json or pass vision_tower_path)")
    vision = VisionEncoder.from_directory(tower_dir, config)
    with torch.device("meta"):  # parameters are assigned from the files below, never initialised
        model = LongLLaVA(config, vision=vision)
    names = _check_names_and_shapes(path, model, stored)
    tensors = _read_tensors(path, stored, device)
    model.load_state_dict({names[key]: value for key, value in tensors.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:  # assigning the embedding replaced the tied parameter
        model.llm.lm_head.weight = model.llm.embed_tokens.weight
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def _check_names_and_shapes(path: Path, model: LongLLaVA, stored: Stored) -> dict[str, str]:
    """Each stored key's parameter name in ``model``, once every one is known and has its shape."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("vision.")}
    if model.config.tie_word_embeddings:
        expected.pop(TIED_HEAD)
    names = {}
    for key, (_, shape) in stored.items():
        mine = from_longllava_key(key)
        if mine is None:
            raise CheckpointError(f"{path}: unexpected parameter {key!r}")
        if mine not in expected:
            raise CheckpointError(f"{path}: parameter {key!r} does not belong to this config")
        if shape != tuple(expected[mine].shape):
            raise CheckpointError(f"{path}: {key} has shape {shape}, the config needs {tuple(expected[mine].shape)}")
        names[key] = mine
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} parameters are missing, e.g. {missing[:3]}")
    return names


# ---------------------------------------------------------------------------- writing
def save_checkpoint(model: LongLLaVA, path: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write ``model`` in the layout ``load_checkpoint`` (and LongLLaVA) reads.

    The tower goes to ``vision_tower/`` as a CLIP directory, referenced from the config.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.vision.save_directory(path / TOWER_DIR)
    config = model.config.model_copy(update={"mm_vision_tower": TOWER_DIR})
    config.to_json_file(path / "config.json")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in model.state_dict().items():
        if key.startswith("vision.") or (key == TIED_HEAD and model.config.tie_word_embeddings):
            continue  # a tied head is the embedding, stored once (as Hugging Face does)
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][to_longllava_key(key)] = value.detach().contiguous().cpu()
        size += nbytes
    for stale in [*path.glob("model-*-of-*.safetensors"), path / SINGLE_NAME, path / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_NAME), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
