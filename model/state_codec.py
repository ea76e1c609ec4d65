"""Session state to bytes and back, whole or as the delta since a given length.

A delta from length ``a`` to ``b`` holds the K/V rows ``a:b`` of every attention layer, the
Mamba states at ``b`` and the last hidden row: the K/V cache is append-only and the rest is
small, so this is what a per-step checkpoint must write. The whole state is the delta from 0.
Deltas apply in order onto a state of exactly their base length; anything else (another
model's layout, a gap, a corrupted byte) raises ``StateMismatchError`` or
``CorruptBlobError`` and leaves the target state untouched.

The tensors of a delta are also available on their own (``delta_tensors``,
``apply_delta``), for containers that add their own framing, like the serving layer's
checkpoint log. ``apply_delta(..., rewind=True)`` first truncates a longer state to the
delta's base, which is how a logged rollback replays.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import HybridLMConfig
from .state import MambaLayerState, SessionState
from .tensorpack import DTYPES, CorruptBlobError, pack, unpack

KIND = "longllava.session_state"


class StateMismatchError(ValueError):
    """A valid state blob that does not fit this state (layout, dtype or length)."""


def state_layout(state: SessionState) -> dict:
    """What a delta must agree on to be applied: layer kinds, shapes and dtypes."""
    mamba = {str(i): [list(m.conv.shape), list(m.ssm.shape)] for i, m in sorted(state.mamba.items())}
    kv = {str(i): list(c.k.shape[:2]) + [c.k.shape[3]] for i, c in sorted(state.kv.items())}
    dtype = next(iter(state.kv.values())).dtype if state.kv else next(iter(state.mamba.values())).conv.dtype
    return {"mamba": mamba, "kv": kv, "hidden": state.hidden_size, "dtype": str(dtype).removeprefix("torch.")}


def kv_tensors(state: SessionState, since: int = 0) -> dict[str, torch.Tensor]:
    """The K/V rows after ``since``, as views of the live state (copy them to keep them)."""
    if not 0 <= since <= state.length:
        raise ValueError(f"since={since} is outside the state's 0..{state.length} tokens")
    tensors: dict[str, torch.Tensor] = {}
    for i, cache in state.kv.items():
        tensors[f"kv.{i}.k"] = cache.k[:, :, since:]
        tensors[f"kv.{i}.v"] = cache.v[:, :, since:]
    return tensors


def recurrent_tensors(state: SessionState) -> dict[str, torch.Tensor]:
    """The Mamba states and the hidden row at the state's length, as views."""
    tensors: dict[str, torch.Tensor] = {}
    for i, m in state.mamba.items():
        tensors[f"mamba.{i}.conv"] = m.conv
        tensors[f"mamba.{i}.ssm"] = m.ssm
    if state.last_hidden is not None:
        tensors["hidden"] = state.last_hidden
    return tensors


def delta_tensors(state: SessionState, since: int = 0) -> dict[str, torch.Tensor]:
    """The delta's tensors as views of the live state (copy them to keep them)."""
    return kv_tensors(state, since) | recurrent_tensors(state)


def delta_meta(state: SessionState, since: int = 0) -> dict[str, Any]:
    return {"base_length": since, "length": state.length, "layout": state_layout(state)}


def state_to_bytes(state: SessionState, since: int = 0) -> bytes:
    """Serialise the state, or only what was added after length ``since``."""
    return pack(KIND, delta_tensors(state, since), delta_meta(state, since))


def apply_state_delta(state: SessionState, blob: bytes) -> None:
    """Append a delta onto ``state``. Everything is checked before anything changes."""
    apply_delta(state, *unpack(blob, KIND))


def _check_lengths(state: SessionState, meta: dict, rewind: bool) -> tuple[int, int]:
    base, length = meta.get("base_length"), meta.get("length")
    if not isinstance(base, int) or not isinstance(length, int) or not 0 <= base <= length:
        raise CorruptBlobError("state blob has invalid lengths")
    if meta.get("layout") != state_layout(state):
        raise StateMismatchError("state blob was written by a model with another layout or dtype")
    if base != state.length and not (rewind and base < state.length):
        raise StateMismatchError(f"delta starts at length {base} but the state has {state.length} tokens")
    return base, length


def _check_kv(state: SessionState, tensors: dict[str, torch.Tensor], new_rows: int) -> None:
    for i, cache in state.kv.items():
        for t in "kv":
            got = tensors.get(f"kv.{i}.{t}")
            if got is None or got.dtype != cache.dtype or list(got.shape) != [*cache.k.shape[:2], new_rows, cache.k.shape[3]]:
                raise CorruptBlobError(f"state blob: K/V tensor of layer {i} is missing or has the wrong shape or dtype")


def _check_recurrent(state: SessionState, tensors: dict[str, torch.Tensor], length: int) -> None:
    for i, m in state.mamba.items():
        for name, ref in (("conv", m.conv), ("ssm", m.ssm)):
            got = tensors.get(f"mamba.{i}.{name}")
            if got is None or got.dtype != ref.dtype or got.shape != ref.shape:
                raise CorruptBlobError(f"state blob: Mamba {name} state of layer {i} is missing or has the wrong shape or dtype")
    hidden = tensors.get("hidden")
    if hidden is None and length > 0:
        raise CorruptBlobError("state blob of a non-empty history lacks its hidden row")
    layout = state_layout(state)
    if hidden is not None and (hidden.dtype != DTYPES[layout["dtype"]] or list(hidden.shape) != [1, layout["hidden"]]):
        raise CorruptBlobError("state blob: the hidden row has the wrong shape or dtype")


def _check_names(tensors: dict[str, torch.Tensor], expected: set[str]) -> None:
    if set(tensors) - {"hidden"} != expected:
        raise CorruptBlobError("state blob holds the wrong set of tensors")


def _kv_names(state: SessionState) -> set[str]:
    return {f"kv.{i}.{t}" for i in state.kv for t in "kv"}


def _recurrent_names(state: SessionState) -> set[str]:
    return {f"mamba.{i}.{t}" for i in state.mamba for t in ("conv", "ssm")}


def apply_delta(state: SessionState, tensors: dict[str, torch.Tensor], meta: dict, rewind: bool = False) -> None:
    """Apply a delta's tensors and meta (as ``delta_tensors``/``delta_meta`` made them).

    With ``rewind``, a state longer than the delta's base is first truncated to it (the
    delta then supplies the Mamba states and hidden row at its end, as a logged rollback
    does). Everything is checked before anything changes.
    """
    base, length = _check_lengths(state, meta, rewind)
    _check_names(tensors, _kv_names(state) | _recurrent_names(state))
    _check_kv(state, tensors, length - base)
    mamba, hidden = recurrent_from(state, tensors, length)
    _append_rows(state, tensors, base, length)
    state.mamba, state.last_hidden = mamba, hidden
    state.snapshot()


def apply_kv_rows(state: SessionState, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Truncate to the delta's base and append its K/V rows, leaving the Mamba states and
    hidden row as they were: the caller then loads those of the new length
    (``load_recurrent``). This is how a chain of snapshot segments replays."""
    base, length = _check_lengths(state, meta, rewind=True)
    _check_names(tensors, _kv_names(state))
    _check_kv(state, tensors, length - base)
    _append_rows(state, tensors, base, length)


def load_recurrent(state: SessionState, tensors: dict[str, torch.Tensor]) -> None:
    """Take the Mamba states and hidden row (``recurrent_tensors`` of a state of the same
    history and length) as this state's own."""
    _check_names(tensors, _recurrent_names(state))
    state.mamba, state.last_hidden = recurrent_from(state, tensors, state.length)


def recurrent_from(
    state: SessionState, tensors: dict[str, torch.Tensor], length: int
) -> tuple[dict[int, MambaLayerState], torch.Tensor | None]:
    """Checked Mamba states and hidden row, on the state's device, for a history of
    ``length`` tokens with this state's layout (other tensors are ignored); the state
    itself is not changed."""
    _check_recurrent(state, tensors, length)
    device = state.device
    mamba = {
        i: MambaLayerState(tensors[f"mamba.{i}.conv"].to(device), tensors[f"mamba.{i}.ssm"].to(device))
        for i in state.mamba
    }
    hidden = tensors.get("hidden")
    return mamba, None if hidden is None else hidden.to(device)


def _append_rows(state: SessionState, tensors: dict[str, torch.Tensor], base: int, length: int) -> None:
    device = state.device
    state.rewind(base, state.mamba, state.last_hidden)
    for i, cache in state.kv.items():
        cache.append(tensors[f"kv.{i}.k"].to(device), tensors[f"kv.{i}.v"].to(device))
    state.length = length


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
    apply_delta(state, tensors, meta)
    return state
