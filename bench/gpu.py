"""The GPU benchmark: parity first, then the 1000-image run of a 9B-shaped LongLLaVA, its peers
and batched decode, each figure next to its analytic floor. One command, under 8 minutes:

    python -m bench.gpu                    # on the GPU machine, from the repository root
    python -m bench.gpu --smoke            # a tiny config and a few steps, on any machine

Sections, in order; each writes its results into the JSON file (``--out``) as soon as it
ends, so a run cut short keeps what it measured, and an error in one section is recorded
and the next one goes on:

1. ``parity``: the Triton kernels against the pure-PyTorch reference at the 9B shape
   (float32 and bf16), and a small model on the active backend against
   ``transformers.JambaForCausalLM``: full pass, chunked appends, batched decode.
2. ``roofline``: the card's measured bf16 matmul rate and copy bandwidth.
3. ``hybrid``: the 9B-shaped hybrid (hidden 4096, 32 layers, one attention layer per 8,
   dense, random bf16 weights) appends 1000 image observations of 36 tokens, then of 144,
   one per step, as the Engine does (a Mamba snapshot per step). Per-step latency at steps
   10, 100, 500, 1000 (median of the nine steps around each), state bytes, peak memory,
   decode tokens/s at the end. Also: one CLIP-L/14-336 image through the tower and projector.
4. ``capacity``: eight sessions of 1000 144-token images each, resident at once, decoding
   together.
5. ``batched_decode``: 1, 8 and 32 sessions at different history lengths, one forward per token.
6. ``transformers``: the same weights in ``JambaForCausalLM`` (pure-torch path; mamba-ssm
   is not installed): its multi-token append on its cache step by step, as far as it gets
   in ``--peer-seconds``, then its token-by-token path for a few tokens.
7. ``attention_only``: a pure-attention model of the same width, depth and parameter count
   through the same 1000 steps of 144 tokens.
8. ``checkpoint_144`` (between 4 and 5): 100 image steps with and without the durable
   session log (pinned device-to-host copies, a writer thread on the local disk),
   interleaved; then a restore from the log next to re-prefilling the same history.

Floors: FLOPs over the measured matmul rate and bytes (weights, K/V read, states) over the
measured copy bandwidth; the floor is the larger, and every timing is reported as a ratio
to it. The GPU machine lacks pydantic and fsspec: ``bench/gpu_wheels.sh`` says how to carry them.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import itertools
import json
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():  # the smoke run checks the Triton kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.append import step_flops  # noqa: E402
from model import kernels, ops  # noqa: E402
from model.config import HybridLMConfig, LongLLaVAConfig, VisionConfig  # noqa: E402
from model.convert import from_jamba_config, from_jamba_state_dict, to_jamba_config, to_jamba_state_dict  # noqa: E402
from model.default import DEFAULT_CONFIG  # noqa: E402
from model.llm import HybridLM  # noqa: E402
from model.state import BatchKV, DecodeBatch, KVCache, SessionState  # noqa: E402
from model.vision import Projector, VisionEncoder  # noqa: E402

LONGLLAVA_9B = dict(  # LongLLaVA-9B's LLM (Jamba-9B layout, dense)
    vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, num_experts=1, num_experts_per_tok=1, attn_layer_period=8, attn_layer_offset=4,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256,
)
SMOKE = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, num_experts=1, num_experts_per_tok=1, attn_layer_period=8, attn_layer_offset=4,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=16,
)
SNAPSHOTS = 64  # the Engine's default rollback window: one Mamba snapshot per step


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds of ``fn()`` with the device's queue drained before and after, and its result."""
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t, result


def clock(fn: Callable[[], object], device: torch.device) -> float:
    return timed(fn, device)[0]


def median_time(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(clock(fn, device) for _ in range(reps))


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- analytics
def weight_bytes(lm: HybridLM) -> int:
    """Bytes one forward reads: every parameter but the embedding table (rows are gathered)."""
    return sum(p.nbytes for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))


def kv_bytes_per_token(c: HybridLMConfig, itemsize: int) -> int:
    return len(c.attention_layers) * 2 * c.num_key_value_heads * c.head_dim * itemsize


def mamba_state_bytes(c: HybridLMConfig, itemsize: int) -> int:
    return len(c.mamba_layers) * c.d_inner * (c.mamba_d_conv * itemsize + c.mamba_d_state * 4)


class Floor:
    """The roofline: the larger of FLOPs over the matmul rate and bytes over the copy bandwidth."""

    def __init__(self, flops_per_s: float, bytes_per_s: float):
        self.flops_per_s, self.bytes_per_s = flops_per_s, bytes_per_s

    def seconds(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops_per_s, nbytes / self.bytes_per_s)

    def append(self, lm: HybridLM, new: int, history: int) -> float:
        c, item = lm.config, lm.dtype.itemsize
        nbytes = weight_bytes(lm) + kv_bytes_per_token(c, item) * (history + new) + 2 * mamba_state_bytes(c, item)
        return self.seconds(step_flops(c, new, history), nbytes)

    def decode(self, lm: HybridLM, histories: list[int]) -> float:
        """One token for each session: weights once, each session's K/V and states."""
        c, item = lm.config, lm.dtype.itemsize
        nbytes = weight_bytes(lm) + sum(kv_bytes_per_token(c, item) * (h + 1) + 2 * mamba_state_bytes(c, item) for h in histories)
        return self.seconds(sum(step_flops(c, 1, h) for h in histories), nbytes)


# ----------------------------------------------------------------------------- building
def build(config: HybridLMConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> HybridLM:
    """Random weights made on the device in the target dtype (no float32 copy of 9B on the host)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            lm = HybridLM(config)
    finally:
        torch.set_default_dtype(default)
    return lm.to(dtype).eval()


def observations(lm: HybridLM, tokens: int, count: int = 4) -> list[torch.Tensor]:
    """Image observations: random rows at the embedding's scale, standing in for projected
    CLIP features (the tower is timed on its own)."""
    g = torch.Generator(device=lm.device).manual_seed(1)
    scale = float(lm.embed_tokens.weight.float().std())
    return [
        (torch.randn(tokens, lm.config.hidden_size, generator=g, device=lm.device) * scale).to(lm.dtype)
        for _ in range(count)
    ]


def history_state(lm: HybridLM, tokens: int) -> SessionState:
    """A session with ``tokens`` of history, prefilled in chunks of up to 8192 (the same state
    as small steps would leave)."""
    state = lm.new_state(max_snapshots=1)
    rows = observations(lm, min(8192, tokens), count=1)[0]
    for start in range(0, tokens, len(rows)):
        lm.prefill(state, rows[: tokens - start], logits="none")
    return state


def around(times: list[float], step: int) -> float:
    """Median latency of the nine steps around ``step`` (1-based), in ms."""
    lo, hi = max(0, step - 5), min(len(times), step + 4)
    return statistics.median(times[lo:hi]) * 1e3


# ----------------------------------------------------------------------------- sections
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


@torch.no_grad()
def kernel_parity(device: torch.device, smoke: bool) -> dict:
    """Each Triton kernel against the reference, at the 9B shape: relative errors."""
    out: dict = {}
    triton = ops._triton()
    if isinstance(triton, str):
        out["triton"] = triton
    else:
        g = torch.Generator(device=device).manual_seed(0)
        shapes = [(2, 64, 16, 37)] if smoke else [(2, 8192, 16, 144), (3, 200, 16, 37)]  # the 9B's, and a ragged one
        for (batch, d, n, L), dt in itertools.product(shapes, (torch.float32, torch.bfloat16)):
            r = lambda *s: torch.randn(*s, generator=g, device=device)
            xz = r(batch, L, 2 * d).to(dt)
            x, z = xz.transpose(1, 2).chunk(2, dim=1)
            dtv = (r(batch, L, d) - 1).to(dt).transpose(1, 2)
            B, C = r(batch, L, 2 * n).to(dt).transpose(1, 2).chunk(2, dim=1)
            A, Dv, bias, h0 = -torch.exp(r(d, n)), r(d), r(d) * 0.5, r(batch, d, n)
            args = (x, dtv, A, B, C, Dv, z, bias, h0)
            (y_ref, h_ref), (y, h) = kernels.selective_scan(*args), triton.selective_scan(*args)
            w, cb, cs = r(d, 4).to(dt), r(d).to(dt), r(batch, d, 4).to(dt)
            (c_ref, cs_ref), (c, cs_new) = kernels.causal_conv1d(x, w, cb, cs), triton.causal_conv1d(x, w, cb, cs)
            step = [t[..., 0].contiguous() for t in (x, dtv, B, C, z)]
            s_ref, s = h0.clone(), h0.clone()
            u_ref = kernels.selective_state_update(s_ref, step[0], step[1], A, step[2], step[3], Dv, step[4], bias)
            u = triton.selective_state_update(s, step[0], step[1], A, step[2], step[3], Dv, step[4], bias)
            k_ref, k = cs.clone(), cs.clone()
            v_ref = kernels.causal_conv1d_update(step[0], w, cb, k_ref)
            v = triton.causal_conv1d_update(step[0], w, cb, k)
            out[f"kernels_{str(dt).removeprefix('torch.')}_d{d}_L{L}"] = {
                "scan_y": rel_err(y, y_ref), "scan_state": rel_err(h, h_ref), "conv": rel_err(c, c_ref),
                "conv_state_exact": bool(torch.equal(cs_new, cs_ref)), "state_update_y": rel_err(u, u_ref),
                "state_update_state": rel_err(s, s_ref), "conv_update": rel_err(v, v_ref),
                "conv_update_state_exact": bool(torch.equal(k, k_ref)),
            }
        for dt in (torch.float32, torch.bfloat16):  # decode attention over caches of different lengths
            lengths = [40, 300] if smoke else [5000, 300, 2049, 1]
            ours, refs = [], []
            for n in lengths:
                rows = [torch.randn(1, 8, n, 128, generator=g, device=device).to(dt) for _ in range(2)]
                for store in (ours, refs):
                    store.append(KVCache(8, 128, dt, device))
                    store[-1].append(*rows)
            q = torch.randn(len(lengths), 32, 1, 128, generator=g, device=device).to(dt)
            k, v = (torch.randn(len(lengths), 8, 1, 128, generator=g, device=device).to(dt) for _ in range(2))
            got = triton.append_and_attend(q, k, v, BatchKV(ours))
            out[f"decode_attention_{str(dt).removeprefix('torch.')}"] = {
                "out": rel_err(got, kernels.append_and_attend(q, k, v, refs)),
                "caches_exact": all(torch.equal(a.k, b.k) and torch.equal(a.v, b.v) for a, b in zip(ours, refs)),
            }
        tolerance = {"float32": 1e-4, "bfloat16": 1e-2}
        out["passed"] = all(
            v is True or (not isinstance(v, bool) and v <= next(tol for dt, tol in tolerance.items() if dt in name))
            for name, case in out.items() for v in case.values()
        )
    return out


@torch.no_grad()
def model_parity(device: torch.device, dtype: torch.dtype) -> dict:
    """A small model on the active backend against transformers, and the device's append attention."""
    from transformers import JambaForCausalLM

    out: dict = {"kernels": ops.describe(device)}
    # a small model on the device, active backend, against transformers with the same weights
    small = HybridLMConfig(**{**SMOKE, "num_experts": 4, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    jcfg = to_jamba_config(small)
    jcfg.use_mamba_kernels = False  # as in section_transformers
    peer = JambaForCausalLM(jcfg).to(device).eval()
    mine = HybridLM(from_jamba_config(peer.config)).to(device).eval()
    mine.load_state_dict(from_jamba_state_dict(peer.state_dict()))
    ids = torch.randint(0, small.vocab_size, (300,), device=device)
    expected = peer(ids[None], use_cache=False).logits[0]
    state = mine.new_state()
    chunks = torch.cat([mine.prefill(state, mine.embed_tokens(ids[a:b]), logits="all") for a, b in ((0, 144), (144, 180), (180, 290))])
    others = [mine.new_state() for _ in range(2)]
    mine.prefill(others[0], mine.embed_tokens(ids[:250]))
    mine.prefill(others[1], mine.embed_tokens(ids[:270]))
    decoded = []
    with DecodeBatch([state, *others]) as batch:
        for t in range(10):
            step = torch.stack([ids[290 + t], ids[250 + t], ids[270 + t]])
            decoded.append(mine.decode(batch, mine.embed_tokens(step)))
    out["model_fp32_max_abs_err"] = {
        "full_pass": float((mine(ids[:290]) - expected[:290]).abs().max()),
        "chunked_append": float((chunks - expected[:290]).abs().max()),
        "batched_decode": max(
            float((torch.stack([d[j] for d in decoded]) - expected[start : start + 10]).abs().max())
            for j, start in enumerate((290, 250, 270))
        ),
    }
    # attention of an append onto a long cache, on the device's path, against explicit math
    q = torch.randn(1, 32, 144, 128, device=device, dtype=dtype)
    k = torch.randn(1, 8, 4096 + 144, 128, device=device, dtype=dtype)
    v = torch.randn_like(k)
    got = kernels.attention(q, k, v)
    kk, vv = (t.float().repeat_interleave(4, dim=1) for t in (k, v))
    scores = q.float() @ kk.transpose(-1, -2) / 128**0.5
    mask = torch.ones(144, 4096 + 144, dtype=torch.bool, device=device).tril(4096)
    ref = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    out["attention_append_rel_err"] = rel_err(got, ref)
    return out


def section_roofline(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    n = 1024 if smoke else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, reps=10)
    size = (64 if smoke else 2048) * 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    c = median_time(lambda: dst.copy_(src), device, reps=10)
    return {"matmul_tflops": 2 * n**3 / t / 1e12, "copy_gb_s": 2 * size / c / 1e9, "matmul_n": n, "copy_bytes": size}


@torch.no_grad()
def run_appends(lm: HybridLM, tokens: int, steps: int, floor: Floor, checkpoints: list[int]) -> tuple[dict, SessionState]:
    """``steps`` observations of ``tokens`` rows, one per step, with the Engine's snapshot per step."""
    device = lm.device
    free(device)
    reset_peak(device)
    obs = observations(lm, tokens)
    state = lm.new_state(max_snapshots=SNAPSHOTS)
    times = []
    for i in range(steps):
        def step() -> None:
            state.snapshot()
            lm.prefill(state, obs[i % len(obs)], logits="last")
        times.append(clock(step, device))
    at = {}
    for s in checkpoints:
        ms = around(times, s)
        fl = floor.append(lm, tokens, (s - 1) * tokens) * 1e3
        at[s] = {"ms": ms, "floor_ms": fl, "x_floor": ms / fl}
    first, last = checkpoints[0], checkpoints[-1]
    return {
        "tokens_per_image": tokens,
        "steps": steps,
        "at_step": at,
        "growth": at[last]["ms"] / at[first]["ms"],
        "floor_growth": at[last]["floor_ms"] / at[first]["floor_ms"],
        "state_bytes": state.nbytes,
        "snapshot_bytes": state.snapshot_nbytes,
        "kv_capacity_bytes": sum(c._buf.k.nbytes + c._buf.v.nbytes for c in state.kv.values()),
        "peak_gb": peak_gb(device),
        "total_s": sum(times),
    }, state


@torch.no_grad()
def decode_rate(lm: HybridLM, states: list[SessionState], floor: Floor, tokens: int) -> dict:
    """Greedy decode of ``tokens`` tokens for every session together (no host sync per token)."""
    device = lm.device
    histories = [s.length for s in states]
    with DecodeBatch(states) as batch:
        embeds = lm.embed_tokens(torch.zeros(len(states), dtype=torch.long, device=device))

        def one() -> None:
            nonlocal embeds
            embeds = lm.embed_tokens(lm.decode(batch, embeds).argmax(-1))

        for _ in range(3):
            one()
        t = clock(lambda: [one() for _ in range(tokens)], device)
    ms = t / tokens * 1e3
    fl = floor.decode(lm, histories) * 1e3
    return {
        "sessions": len(states),
        "histories": [min(histories), max(histories)],
        "ms_per_token_step": ms,
        "tokens_per_s": len(states) * tokens / t,
        "floor_ms": fl,
        "x_floor": ms / fl,
    }


@torch.no_grad()
def decode_attention_timing(c: HybridLMConfig, device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    """One attention layer's decode step for a batch of sessions: the Triton kernels (one
    append, one flash-decoding, one merge launch) against SDPA per session."""
    triton = ops._triton()
    if isinstance(triton, str) or (device.type == "cpu" and not smoke):
        return {"skipped": "no Triton" if isinstance(triton, str) else "CPU"}
    out = {}
    if smoke:  # the interpreter is slow: just run the code
        shapes, reps = {1: [100], 2: [16, 113]}, 1
    else:
        shapes, reps = {1: [144_000], **{b: [1000 + 97 * j for j in range(b)] for b in (8, 32)}}, 20
    for b, lengths in shapes.items():
        caches, twins = [], []  # one set per method: each call appends a row
        for n in lengths:
            rows = [torch.randn(1, c.num_key_value_heads, n, c.head_dim, device=device, dtype=dtype) for _ in range(2)]
            for store in (caches, twins):
                store.append(KVCache(c.num_key_value_heads, c.head_dim, dtype, device))
                store[-1].append(*rows)
        q = torch.randn(b, c.num_attention_heads, 1, c.head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(b, c.num_key_value_heads, 1, c.head_dim, device=device, dtype=dtype) for _ in range(2))
        batch_kv = BatchKV(caches)
        fused = median_time(lambda: triton.append_and_attend(q, k, v, batch_kv), device, reps=reps)
        looped = median_time(lambda: kernels.append_and_attend(q, k, v, twins), device, reps=reps)
        kv_bytes = sum(cache.nbytes for cache in caches)
        out[str(b)] = {"triton_us": fused * 1e6, "sdpa_per_session_us": looped * 1e6, "speedup": looped / fused,
                       "kv_gb_s_triton": kv_bytes / fused / 1e9, "max_history": max(lengths)}
    return out


@torch.no_grad()
def section_vision(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    """One image through the CLIP tower (CLIP-L/14-336 for the 9B), pooling and projector."""
    cfg = DEFAULT_CONFIG if smoke else LongLLaVAConfig(**LONGLLAVA_9B, vision_config=VisionConfig())
    torch.manual_seed(0)
    with torch.device(device):
        tower, projector = VisionEncoder(cfg).to(dtype).eval(), Projector(cfg).to(dtype).eval()
    size = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, device=device, dtype=dtype)
    t = median_time(lambda: projector(tower(pixels)), device, reps=10)
    return {"image_ms": t * 1e3, "image_tokens": cfg.image_tokens, "tower_params_m": sum(p.numel() for p in tower.parameters()) / 1e6}


@torch.no_grad()
def section_transformers(lm: HybridLM, tokens: int, seconds: float, checkpoints: list[int], floor: Floor) -> dict:
    """The same weights in JambaForCausalLM, sharing storage with ours (no second copy)."""
    from transformers import JambaForCausalLM

    device = lm.device
    jcfg = to_jamba_config(lm.config)
    jcfg.use_mamba_kernels = False  # older 5.x raise on CUDA without mamba-ssm; 5.24 ignores it
    with torch.device("meta"):
        peer = JambaForCausalLM(jcfg)
    peer.load_state_dict(to_jamba_state_dict(lm.state_dict()), assign=True, strict=True)
    peer.eval()
    # The model makes its own cache on the first call (its class differs between 5.x
    # releases), and 5.24 renamed the argument that takes it back from past_key_values to cache.
    cache_arg = "cache" if "cache" in inspect.signature(peer.forward).parameters else "past_key_values"

    def forward(x: torch.Tensor, cache: object | None) -> tuple[torch.Tensor, object]:
        out = peer(inputs_embeds=x[None], use_cache=True, **({cache_arg: cache} if cache is not None else {}))
        return out.logits[0], out.past_key_values

    obs = observations(lm, tokens)
    cache = None
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(times) < checkpoints[-1]:
        x = obs[len(times) % len(obs)]
        seconds_taken, (_, cache) = timed(lambda: forward(x, cache), device)
        times.append(seconds_taken)
    # its chunked append is wrong (env-notes): by how much, against a full pass, next to ours
    ours = lm.new_state(max_snapshots=1)
    mine = [lm.prefill(ours, obs[i], logits="all") for i in range(2)][-1]
    theirs = peer(inputs_embeds=torch.cat(obs[:2])[None], use_cache=False).logits[0, tokens:]
    chunked, _ = forward(obs[1], forward(obs[0], None)[1])
    err = {"ours_vs_full_pass": float((mine.float() - theirs.float()).abs().max()),
           "tf_chunk_vs_full_pass": float((chunked.float() - theirs.float()).abs().max())}
    reached = [s for s in checkpoints if s <= len(times)]
    history = len(times) * tokens
    token_times = []
    for i in range(4):  # its correct path: one token at a time on the cache
        seconds_taken, (_, cache) = timed(lambda: forward(obs[0][i : i + 1], cache), device)
        token_times.append(seconds_taken)
    token_ms = statistics.median(token_times[1:]) * 1e3
    return {
        "chunk_append_ms": {s: around(times, s) for s in reached},
        "steps_done": len(times),
        "token_ms": token_ms,
        "token_path_per_step_ms": token_ms * tokens,
        "token_history": history,
        "chunk_floor_ms": {s: floor.append(lm, tokens, (s - 1) * tokens) * 1e3 for s in reached},
        "logit_err": err,
    }


@torch.no_grad()
def section_checkpoint(lm: HybridLM, tokens: int, steps: int) -> dict:
    """What the checkpoint log costs the request path: two sessions take the same image
    steps in turn, one plain and one whose every change is captured (copied into pinned
    host memory, asynchronously) for the writer thread, which writes to a local directory.
    Then the logged session is restored from its log, next to re-prefilling its history."""
    import tempfile
    from array import array

    from model.prompt import IMAGE_TOKEN_INDEX
    from model.state_codec import state_layout
    from serving.checkpoint import CheckpointPolicy, CheckpointWriter, DirectoryStore, SessionLog, claim, model_fingerprint, restore
    from serving.steps import StepTable

    device = lm.device
    store, writer, session = DirectoryStore(tempfile.mkdtemp(prefix="gpu-checkpoint-")), CheckpointWriter(), "gpu-bench-session"
    store.create_session(session)
    fingerprint = model_fingerprint(lm, "gpu-bench")
    plain, logged = lm.new_state(max_snapshots=SNAPSHOTS), lm.new_state(max_snapshots=SNAPSHOTS)
    log = SessionLog(store, writer, session, claim(store, session), fingerprint, state_layout(logged), CheckpointPolicy())
    table, ids, obs = StepTable(), array("i"), observations(lm, tokens)
    times: dict[str, list[float]] = {"off": [], "on": []}

    def step(state: SessionState, x: torch.Tensor, capture: bool) -> None:
        state.snapshot()
        lm.prefill(state, x, logits="last")
        if capture:
            ids.extend([IMAGE_TOKEN_INDEX] * tokens)
            table.add(state.length, bytes(16))
            table.extend_reply(state.length, "eos")
            log.capture("generate", state, ids, table, table.last - 1)

    for i in range(steps):
        x = obs[i % len(obs)]
        for mode in (("off", "on") if i % 2 else ("on", "off")):
            times[mode].append(clock(lambda: step(logged if mode == "on" else plain, x, mode == "on"), device))
    t = time.perf_counter()
    log.wait()
    drained_s = time.perf_counter() - t
    t = time.perf_counter()
    restored = restore(store, session, fingerprint, lambda: lm.new_state(max_snapshots=1))
    restore_s = time.perf_counter() - t
    writer.close()
    reprefill_s = clock(lambda: history_state(lm, logged.length), device)
    off, on = statistics.median(times["off"]) * 1e3, statistics.median(times["on"]) * 1e3
    return {
        "steps": steps, "tokens_per_image": tokens, "off_ms": off, "on_ms": on, "overhead": on / off - 1,
        "writer_mb_s": writer.stats.bytes / 2**20 / writer.stats.busy_s, "bytes_per_step": writer.stats.bytes / steps,
        "drain_after_last_step_s": drained_s, "restore_s": restore_s, "reprefill_s": reprefill_s,
        "restored_equal": bool(torch.equal(restored.state.last_hidden.cpu(), logged.last_hidden.cpu())),
    }


def attention_only_config(hybrid: HybridLMConfig) -> HybridLMConfig:
    """Every layer attention, with the MLP widened so the parameter count matches the hybrid's."""
    def params(cfg: HybridLMConfig) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in HybridLM(cfg).parameters())

    base = hybrid.model_copy(update={"attn_layer_period": 1, "attn_layer_offset": 0})
    per_unit = 3 * hybrid.hidden_size * hybrid.num_hidden_layers  # parameters per unit of intermediate size
    width = base.intermediate_size + round((params(hybrid) - params(base)) / per_unit / 16) * 16
    return base.model_copy(update={"intermediate_size": width})


# ----------------------------------------------------------------------------- report
def targets(results: dict) -> dict:
    """The issue's targets for the 9B-shaped config, read off the sections (None: not measured)."""
    hybrid, peer, capacity = results.get("hybrid_144") or {}, results.get("transformers") or {}, results.get("capacity") or {}
    at = hybrid.get("at_step", {})
    first = at[min(at)] if at else None
    common = [s for s in peer.get("chunk_append_ms", {}) if s in at]
    return {
        "append_within_3x_floor_at_first_step": first["x_floor"] <= 3 if first else None,
        "growth_within_floor_growth": hybrid["growth"] <= hybrid["floor_growth"] if hybrid else None,
        "x_faster_than_tf_chunk_min": min((peer["chunk_append_ms"][s] / at[s]["ms"] for s in common), default=None),
        "x_faster_than_tf_token": peer["token_path_per_step_ms"] / first["ms"] if peer and first else None,
        "eight_1000_image_sessions_fit_80gb": (
            capacity["projected_peak_gb_with_own_snapshot_rings"] <= 80 if capacity.get("peak_gb") else None
        ),
    }


def table(results: dict) -> str:
    lines = []
    roof = results.get("roofline", {})
    if roof:
        lines.append(f"roofline: {roof['matmul_tflops']:.1f} TFLOP/s bf16 matmul, {roof['copy_gb_s']:.0f} GB/s copy\n")
    for key in ("hybrid_36", "hybrid_144", "attention_only_144"):
        r = results.get(key)
        if not isinstance(r, dict) or "at_step" not in r:
            continue
        lines.append(f"{key}: state {r['state_bytes'] / 2**30:.2f} GiB (+ snapshots {r['snapshot_bytes'] / 2**30:.2f} GiB), peak {r['peak_gb']} GB")
        lines.append("| step | ms | floor ms | x floor |\n|---|---|---|---|")
        for s, a in r["at_step"].items():
            lines.append(f"| {s} | {a['ms']:.2f} | {a['floor_ms']:.2f} | {a['x_floor']:.2f} |")
        lines.append(f"growth {r['growth']:.2f}x (floor {r['floor_growth']:.2f}x); decode: {r.get('decode')}\n")
    for key in ("targets", "capacity", "checkpoint_144", "batched_decode", "decode_attention", "transformers", "vision", "kernel_parity", "model_parity", "errors"):
        if key in results:
            lines.append(f"{key}: {json.dumps(results[key], default=str)}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny config, a few steps: checks the script anywhere")
    p.add_argument("--steps", type=int, help="images per run (default 1000; 12 with --smoke)")
    p.add_argument("--peer-seconds", type=float, default=60.0, help="time given to transformers' chunked path")
    p.add_argument("--skip", nargs="*", default=[], help="sections to leave out")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "docs/bench")) / "gpu.json")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = args.steps or (12 if args.smoke else 1000)
    checkpoints = [s for s in (2, 5, 10, 12) if s <= steps] if args.smoke else [s for s in (10, 100, 500, 1000) if s <= steps]
    config = HybridLMConfig(**(SMOKE if args.smoke else LONGLLAVA_9B))
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "kernels": ops.describe(device),
        "config": "smoke" if args.smoke else "LongLLaVA-9B shape, dense, random weights",
        "errors": {},
    }
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def section(name: str, fn: Callable[[], object]) -> object:
        if name in args.skip:
            return None
        t = time.perf_counter()
        try:
            value = fn()
            results[name] = value
        except Exception as e:  # recorded; the next section goes on
            results["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            value = None
        results.setdefault("section_s", {})[name] = time.perf_counter() - t
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"[{time.perf_counter() - started:6.1f}s] {name} done in {time.perf_counter() - t:.1f}s", flush=True)
        return value

    section("kernel_parity", lambda: kernel_parity(device, args.smoke))
    if "kernel_parity" in results["errors"] and ops.resolve(device) == "triton":
        ops.set_kernels("torch")  # time the rest on the reference rather than lose the run
        results["kernels"] = "FELL BACK after a Triton error: " + ops.describe(device)
    section("model_parity", lambda: model_parity(device, dtype))
    roof = section("roofline", lambda: section_roofline(device, dtype, args.smoke))
    floor = Floor(roof["matmul_tflops"] * 1e12, roof["copy_gb_s"] * 1e9) if roof else Floor(1e12, 1e11)
    section("vision", lambda: section_vision(device, dtype, args.smoke))

    lm = build(config, device, dtype)
    results["params_b"] = sum(p.numel() for p in lm.parameters()) / 1e9
    results["weight_gb"] = weight_bytes(lm) / 1e9
    kept: dict[str, SessionState] = {}

    def hybrid(tokens: int) -> dict:
        run, state = run_appends(lm, tokens, steps, floor, checkpoints)
        run["decode"] = decode_rate(lm, [state], floor, tokens=8 if args.smoke else 32)
        kept[tokens] = state
        return run

    section("hybrid_36", lambda: hybrid(36))
    kept.pop(36, None)
    section("hybrid_144", lambda: hybrid(144))

    def capacity() -> dict:
        """Seven forks of the 1000-image session: each copies its K/V on its first decode.
        Forks share the snapshot ring, so the projection adds a ring per session."""
        base = kept.pop(144)
        sessions = [base, *(base.fork() for _ in range(7))]
        reset_peak(device)
        rate = decode_rate(lm, sessions, floor, tokens=4 if args.smoke else 16)
        reserved = sum(c._buf.k.nbytes + c._buf.v.nbytes for s in sessions for c in s.kv.values())
        projected = (peak_gb(device) or 0) + 7 * base.snapshot_nbytes / 1e9
        result = {
            **rate,
            "sessions_state_gb": sum(s.nbytes for s in sessions) / 1e9,
            "kv_reserved_gb": reserved / 1e9,
            "peak_gb": peak_gb(device),
            "projected_peak_gb_with_own_snapshot_rings": projected,
        }
        del sessions, base
        return result

    section("capacity", capacity)
    free(device)
    section("checkpoint_144", lambda: section_checkpoint(lm, 144, min(steps, 100)))
    free(device)

    def batched() -> dict:
        lengths = [(16 if args.smoke else 1000) + (5 if args.smoke else 97) * j for j in range(32)]
        states = [history_state(lm, n) for n in lengths]
        return {str(b): decode_rate(lm, states[:b], floor, tokens=4 if args.smoke else 32) for b in (1, 8, 32)}

    section("batched_decode", batched)
    section("decode_attention", lambda: decode_attention_timing(config, device, dtype, args.smoke))
    free(device)
    section("transformers", lambda: section_transformers(lm, 144, 5.0 if args.smoke else args.peer_seconds, checkpoints, floor))
    del lm
    free(device)

    def attention_only() -> dict:
        cfg = attention_only_config(config)
        model = build(cfg, device, dtype)
        run, state = run_appends(model, 144, steps, floor, checkpoints)
        run["decode"] = decode_rate(model, [state], floor, tokens=8 if args.smoke else 32)
        run["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
        run["intermediate_size"] = cfg.intermediate_size
        return run

    section("attention_only_144", attention_only)
    results["targets"] = targets(results)
    results["total_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(table(results))
    print(f"wrote {args.out} in {results['total_s']:.0f}s")


if __name__ == "__main__":
    main()
