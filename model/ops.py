"""Which kernels the model runs: the pure-PyTorch reference, the Triton kernels, or (in
training on the CPU) the C++ scan.

``auto`` (the default) takes Triton for CUDA tensors when ``triton`` imports, and the
reference everywhere else. ``LONGLLAVA_KERNELS=auto|torch|triton`` in the environment, or
``set_kernels``/``use_kernels`` in code, overrides it process-wide, e.g. to compare the
two in one benchmark run. Triton on CPU tensors needs its interpreter
(``TRITON_INTERPRET=1``): that is how the tests check the kernels without a GPU.
The Triton set covers the Mamba ops and the decode step's attention over a batch of
sessions; attention over appended chunks is always torch SDPA (``model.kernels.attention``),
whose CUDA flash kernel handles GQA and the lower-right causal mask of an append.

Training (``HybridLM.forward_batch``) needs backward passes, which the Triton kernels do
not have: it runs the reference, except that under ``auto`` on the CPU the selective scan
is the C++ one of ``model.cpu_kernels`` where that builds (``training_kernels``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from types import ModuleType
from typing import Iterator, Literal

import torch

from . import kernels

Kernels = Literal["auto", "torch", "triton"]
CHOICES: tuple[str, ...] = ("auto", "torch", "triton")


def _checked(name: str) -> Kernels:
    if name not in CHOICES:
        raise ValueError(f"kernels must be one of {CHOICES}, got {name!r}")
    return name  # type: ignore[return-value]


_choice: Kernels = _checked(os.environ.get("LONGLLAVA_KERNELS", "auto"))


@functools.cache
def _triton() -> ModuleType | str:
    """The Triton kernels module, or why it cannot be used."""
    try:
        return importlib.import_module("model.triton_kernels")
    except ImportError as e:
        return f"triton is not importable ({e})"


def set_kernels(name: Kernels) -> None:
    global _choice
    _choice = _checked(name)


@contextlib.contextmanager
def use_kernels(name: Kernels) -> Iterator[None]:
    previous = _choice
    set_kernels(name)
    try:
        yield
    finally:
        set_kernels(previous)


def resolve(device: torch.device | str) -> Literal["torch", "triton"]:
    """The backend that runs on ``device`` under the current choice."""
    device = torch.device(device)
    if _choice == "torch":
        return "torch"
    triton = _triton()
    if _choice == "triton":
        if isinstance(triton, str):
            raise RuntimeError(f"kernels='triton' was asked for, but {triton}")
        if device.type != "cuda" and not triton.INTERPRETED:
            raise RuntimeError("Triton kernels run on CUDA tensors, or on the CPU under TRITON_INTERPRET=1")
        return "triton"
    return "triton" if device.type == "cuda" and not isinstance(triton, str) else "torch"


def kernels_for(device: torch.device | str) -> ModuleType:
    """The module whose ``selective_scan``, ``selective_state_update``, ``causal_conv1d``,
    ``causal_conv1d_update`` and ``append_and_attend`` run on ``device``."""
    return _triton() if resolve(device) == "triton" else kernels  # type: ignore[return-value]


def training_kernels(device: torch.device | str) -> ModuleType:
    """The differentiable kernel set for ``device``: the C++ scan on the CPU under ``auto``
    where it builds, the reference everywhere else."""
    if _choice == "auto" and torch.device(device).type == "cpu":
        from . import cpu_kernels

        if not isinstance(cpu_kernels.load(), str):
            return cpu_kernels
    return kernels


def describe(device: torch.device | str) -> str:
    """Which implementation each op uses on ``device``, for start-up logs and benchmark tables."""
    if resolve(device) == "triton":
        mamba = (
            "Triton (selective scan from the recurrent state, state update, conv1d; "
            "decode attention over every session's own K/V in one launch)"
        )
    else:
        mamba = "pure-PyTorch reference"
        triton = _triton()
        if torch.device(device).type == "cuda" and isinstance(triton, str):
            mamba += f"; {triton}"
    return f"mamba: {mamba}; attention: {kernels.describe_attention(device)}"
