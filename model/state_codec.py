"""Session state to bytes and back, whole or as the delta since a given length.

A delta from length ``a`` to ``b`` holds the K/V rows ``a:b`` of every attention layer and
the Mamba states at ``b``: the K/V cache is append-only and the Mamba states are small, so
this is what a per-step checkpoint must write. The whole state is the delta from 0.
Deltas apply in order onto a state of exactly their base length; anything else (another
model's layout, a gap, a corrupted byte) raises ``StateMismatchError`` or
``CorruptBlobError`` and leaves the target state untouched.
"""

from __future__ import annotations

import torch

from .config import HybridLMConfig
from .state import MambaLayerState, SessionState
from .tensorpack import DTYPES, CorruptBlobError, pack, unpack

KIND = "longllava.session_state"


class StateMismatchError(ValueError):
    """A valid state blob that does not fit this state (layout, dtype or length)."""


def _layout(state: SessionState) -> dict:
    """What a blob must agree on to be applied: layer kinds, shapes and dtypes."""
    mamba = {str(i): [list(m.conv.shape), list(m.ssm.shape)] for i, m in sorted(state.mamba.items())}
    kv = {str(i): list(c.k.shape[:2]) + [c.k.shape[3]] for i, c in sorted(state.kv.items())}
    dtype = next(iter(state.kv.values())).dtype if state.kv else next(iter(state.mamba.values())).conv.dtype
    return {"mamba": mamba, "kv": kv, "dtype": str(dtype).removeprefix("torch.")}


def state_to_bytes(state: SessionState, since: int = 0) -> bytes:
    """Serialise the state, or only what was added after length ``since``."""
    if not 0 <= since <= state.length:
        raise ValueError(f"since={since} is outside the state's 0..{state.length} tokens")
    tensors: dict[str, torch.Tensor] = {}
    for i, cache in state.kv.items():
        tensors[f"kv.{i}.k"] = cache.k[:, :, since:]
        tensors[f"kv.{i}.v"] = cache.v[:, :, since:]
    for i, m in state.mamba.items():
        tensors[f"mamba.{i}.conv"] = m.conv
        tensors[f"mamba.{i}.ssm"] = m.ssm
    meta = {"base_length": since, "length": state.length, "layout": _layout(state)}
    return pack(KIND, tensors, meta)


def apply_state_delta(state: SessionState, blob: bytes) -> None:
    """Append a delta onto ``state``. Everything is checked before anything changes."""
    _apply(state, *unpack(blob, KIND))


def _apply(state: SessionState, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    base, length = meta.get("base_length"), meta.get("length")
    if not isinstance(base, int) or not isinstance(length, int) or not 0 <= base <= length:
        raise CorruptBlobError("state blob has invalid lengths")
    if meta.get("layout") != _layout(state):
        raise StateMismatchError("state blob was written by a model with another layout or dtype")
    if base != state.length:
        raise StateMismatchError(f"delta starts at length {base} but the state has {state.length} tokens")
    expected = {f"kv.{i}.{t}" for i in state.kv for t in "kv"} | {f"mamba.{i}.{t}" for i in state.mamba for t in ("conv", "ssm")}
    if set(tensors) != expected:
        raise CorruptBlobError("state blob holds the wrong set of tensors")
    new_rows = length - base
    for i, cache in state.kv.items():
        for t in "kv":
            got = tensors[f"kv.{i}.{t}"]
            if got.dtype != cache.dtype or list(got.shape) != [*cache.k.shape[:2], new_rows, cache.k.shape[3]]:
                raise CorruptBlobError(f"state blob: K/V tensor of layer {i} has the wrong shape or dtype")
    for i, m in state.mamba.items():
        for name, ref in (("conv", m.conv), ("ssm", m.ssm)):
            got = tensors[f"mamba.{i}.{name}"]
            if got.dtype != ref.dtype or got.shape != ref.shape:
                raise CorruptBlobError(f"state blob: Mamba {name} state of layer {i} has the wrong shape or dtype")

    device = state.device
    for i, cache in state.kv.items():
        cache.append(tensors[f"kv.{i}.k"].to(device), tensors[f"kv.{i}.v"].to(device))
    state.mamba = {
        i: MambaLayerState(tensors[f"mamba.{i}.conv"].to(device), tensors[f"mamba.{i}.ssm"].to(device))
        for i in state.mamba
    }
    state.length = length
    state.snapshot()


def state_from_bytes(
    blob: bytes, config: HybridLMConfig, device: torch.device | str = "cpu", max_snapshots: int = 64
) -> SessionState:
    """Rebuild a whole state (a delta from length 0) for a model with ``config``."""
    tensors, meta = unpack(blob, KIND)
    layout = meta.get("layout")
    dtype = DTYPES.get(layout.get("dtype")) if isinstance(layout, dict) else None
    if dtype is None:
        raise CorruptBlobError("state blob does not name a valid dtype")
    state = SessionState.empty(config, dtype, device, max_snapshots)
    _apply(state, tensors, meta)
    return state
