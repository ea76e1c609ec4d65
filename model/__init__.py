"""The hybrid LongLLaVA network, its recurrent session state, and checkpoint loading.

This package imports nothing from the rest of the project.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import HybridLMConfig, LongLLaVAConfig, VisionConfig
from .default import DEFAULT_CONFIG, default_model
from .llm import HybridLM
from .longllava import LongLLaVA
from .state import DecodeBatch, SessionState
from .state_codec import StateMismatchError, apply_state_delta, state_from_bytes, state_to_bytes
from .tensorpack import CorruptBlobError

__all__ = [
    "CheckpointError",
    "CorruptBlobError",
    "DEFAULT_CONFIG",
    "DecodeBatch",
    "HybridLM",
    "HybridLMConfig",
    "LongLLaVA",
    "LongLLaVAConfig",
    "SessionState",
    "StateMismatchError",
    "VisionConfig",
    "apply_state_delta",
    "default_model",
    "load_checkpoint",
    "save_checkpoint",
    "state_from_bytes",
    "state_to_bytes",
]
