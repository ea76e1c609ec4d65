"""The hybrid LongLLaVA network, its recurrent session state, and checkpoint loading.

This package imports nothing from the rest of the project. Its names load on first use,
so ``model.prompt`` (PIL and numpy only) can be imported without torch, as a remote
agent does.
"""

import importlib

_HOMES = {
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "HybridLMConfig": "config",
    "LongLLaVAConfig": "config",
    "VisionConfig": "config",
    "DEFAULT_CONFIG": "default",
    "default_model": "default",
    "HybridLM": "llm",
    "LongLLaVA": "longllava",
    "DecodeBatch": "state",
    "SessionState": "state",
    "StateMismatchError": "state_codec",
    "apply_state_delta": "state_codec",
    "state_from_bytes": "state_codec",
    "state_to_bytes": "state_codec",
    "CorruptBlobError": "tensorpack",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
