"""Weights between this project's ``HybridLM`` and ``transformers.JambaForCausalLM``.

transformers renamed the Jamba remote-code modules that LongLLaVA's checkpoints use:
``moe`` became ``feed_forward``, ``pre_moe_layernorm`` became ``pre_ff_layernorm``,
``B_layernorm``/``C_layernorm`` became lower case, and a dense layer's ``moe.experts.0``
became a plain ``feed_forward`` MLP. From version 5 it also stores each MoE layer's experts
as two fused 3-D tensors. Both directions are plain dict rewrites, so the
same weights can run in both implementations for parity tests and benchmarks.
"""

from __future__ import annotations

import re

import torch

from .config import HybridLMConfig

_EXPERT = re.compile(r"^(layers\.\d+)\.moe\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"^model\.(layers\.\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")
_DENSE = re.compile(r"^model\.(layers\.\d+)\.feed_forward\.(gate|up|down)_proj\.weight$")
# (ours, transformers') pairs of name pieces inside a layer
_RENAMES = [
    (".pre_moe_layernorm.", ".pre_ff_layernorm."),
    (".B_layernorm.", ".b_layernorm."),
    (".C_layernorm.", ".c_layernorm."),
]


def _rename_to_jamba(key: str) -> str:
    if key.startswith("lm_head."):
        return key
    for ours, theirs in _RENAMES:
        key = key.replace(ours, theirs)
    return "model." + key.replace(".moe.", ".feed_forward.")


def _rename_from_jamba(key: str) -> str:
    if key.startswith("lm_head."):
        return key
    for ours, theirs in _RENAMES:
        key = key.replace(theirs, ours)
    return key.removeprefix("model.").replace(".feed_forward.", ".moe.")


def to_jamba_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``HybridLM.state_dict()`` to ``JambaForCausalLM`` keys, fusing each MoE layer's experts."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        m = _EXPERT.match(key)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = value
        else:
            out[_rename_to_jamba(key)] = value
    for layer, by_expert in experts.items():
        if len(by_expert) == 1:  # a dense layer: transformers' plain MLP
            for proj, w in by_expert[0].items():
                out[f"model.{layer}.feed_forward.{proj}_proj.weight"] = w
            continue
        order = [by_expert[j] for j in sorted(by_expert)]
        out[f"model.{layer}.feed_forward.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e["gate"], e["up"]], dim=0) for e in order]
        )
        out[f"model.{layer}.feed_forward.experts.down_proj"] = torch.stack([e["down"] for e in order])
    return out


def from_jamba_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``JambaForCausalLM.state_dict()`` to ``HybridLM`` keys, splitting fused experts."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        dense = _DENSE.match(key)
        if dense:
            out[f"{dense[1]}.moe.experts.0.{dense[2]}_proj.weight"] = value
            continue
        m = _FUSED.match(key)
        if not m:
            out[_rename_from_jamba(key)] = value
            continue
        for j, w in enumerate(value.unbind(0)):
            prefix = f"{m[1]}.moe.experts.{j}"
            if m[2] == "down_proj":
                out[f"{prefix}.down_proj.weight"] = w
            else:
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}.gate_proj.weight"], out[f"{prefix}.up_proj.weight"] = gate, up
    return out


def to_jamba_config(config: HybridLMConfig):
    """A ``transformers.JambaConfig`` with the same architecture."""
    from transformers import JambaConfig

    fields = {k: v for k, v in config.model_dump().items() if k in HybridLMConfig.model_fields}
    return JambaConfig(**fields)


def from_jamba_config(jamba_config) -> HybridLMConfig:
    return HybridLMConfig.model_validate(
        {k: v for k, v in jamba_config.to_dict().items() if k in HybridLMConfig.model_fields}
    )
