"""Per-step cost of appending an observation onto a long history, against the peers.

For each config and observation size (40 text tokens, or a 144-token image), the history
grows one observation per step to 1000 steps. At 10, 100, 500 and 1000 steps, with the same
weights and the same history, it times one more step done four ways:

- ``ours``: this project's chunked append onto the session state;
- ``tf-token``: transformers.JambaForCausalLM one token at a time on its cache (correct);
- ``tf-chunk``: transformers' multi-token append on its cache (fast but wrong: it restarts
  the SSM state for a chunk of more than one token);
- ``re-prefill``: reading the whole history again from an empty state (this project's
  chunked prefill, the strongest form of the sliding-window baseline).

The transformers caches are filled with exactly our state (K/V rows, conv and SSM states),
so every method continues the same history. Each method's logit error on the new
observation is measured against a full pass: transformers' own uncached forward where it
fits in memory (up to 100 steps), else our re-prefill.

    python bench/append.py                      # both configs, everything (about 30 min on 2 cores)
    python bench/append.py --configs jamba256 --steps 10 100 --reps 3

Prints markdown tables and writes JSON and a PNG plot next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, JambaForCausalLM

from model.config import HybridLMConfig
from model.convert import to_jamba_config, to_jamba_state_dict
from model.default import DEFAULT_CONFIG
from model.llm import HybridLM
from model.state import SessionState

CONFIGS = {
    "jamba256": HybridLMConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, num_experts=1, num_experts_per_tok=1, attn_layer_period=8, attn_layer_offset=4,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=16,
    ),
    "default": HybridLMConfig.model_validate(DEFAULT_CONFIG.model_dump()),
}
PREFILL_CHUNK = 2048
FULL_PASS_LIMIT = 16_000  # tokens: transformers' uncached forward builds an L x L mask


# ------------------------------------------------------------------------------ analytics
def step_flops(c: HybridLMConfig, new: int, history: int) -> float:
    """Multiply-adds x 2 of one append of ``new`` tokens after ``history`` tokens."""
    d, n, r, h = c.d_inner, c.mamba_d_state, c.dt_rank, c.hidden_size
    kv = c.num_key_value_heads * c.head_dim
    mamba = 2 * (h * 2 * d + d * (r + 2 * n) + r * d + d * h) + 2 * d * c.mamba_d_conv + 9 * d * n
    attn_proj = 2 * (2 * h * h + 2 * h * kv)
    visible = new * history + new * (new + 1) / 2  # keys seen, summed over the new queries
    attn_scores = 4 * c.num_attention_heads * c.head_dim * visible
    total = 2 * h * c.vocab_size  # lm_head, last position only
    for i in range(c.num_hidden_layers):
        experts = c.num_experts_of_layer(i)
        ffn = 2 * 3 * h * c.intermediate_size * min(experts, c.num_experts_per_tok) + (2 * h * experts if experts > 1 else 0)
        total += new * ffn
        total += new * attn_proj + attn_scores if c.is_attention_layer(i) else new * mamba
    return total


def attention_kv_bytes(c: HybridLMConfig, tokens: int, itemsize: int = 4) -> int:
    """K/V of a pure-attention model of the same width and depth (every layer attention)."""
    return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * tokens * itemsize


# ------------------------------------------------------------------------------ peers
def jamba_cache(state: SessionState, config) -> DynamicCache:
    """A transformers cache holding exactly ``state`` (copies, so the original stays intact)."""
    cache = DynamicCache(config=config)
    for i, m in state.mamba.items():
        cache.update_conv_state(m.conv.clone(), i)
        cache.update_recurrent_state(m.ssm.clone(), i)
    for i, kv in state.kv.items():
        cache.update(kv.k.clone(), kv.v.clone(), i)
    return cache


def timed(fns: dict, reps: int) -> dict[str, tuple[float, object]]:
    """Median seconds of each ``fn()`` over ``reps`` rounds (``fn`` returns (seconds, result)).

    Rounds interleave the methods, so that load from elsewhere on the machine falls on all
    of them alike and the ratios stay fair.
    """
    runs = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: (statistics.median(t for t, _ in r), r[-1][1]) for name, r in runs.items()}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------------------ one config
def observation(lm: HybridLM, size: int, g: torch.Generator) -> torch.Tensor:
    """40 text tokens (embedded ids) or a 144-row image observation (random rows at the
    embedding's scale, standing in for projected CLIP features)."""
    if size == 40:
        return lm.embed_tokens(torch.randint(0, lm.config.vocab_size, (size,), generator=g))
    scale = lm.embed_tokens.weight.std()
    return torch.randn(size, lm.config.hidden_size, generator=g) * scale


@torch.no_grad()
def run(name: str, cfg: HybridLMConfig, obs_size: int, steps: list[int], reps: int) -> list[dict]:
    torch.manual_seed(0)
    lm = HybridLM(cfg).eval()
    jcfg = to_jamba_config(cfg)
    peer = JambaForCausalLM(jcfg).eval()
    peer.load_state_dict(to_jamba_state_dict(lm.state_dict()))
    g = torch.Generator().manual_seed(1)

    state = lm.new_state(max_snapshots=1)
    history: list[torch.Tensor] = []
    rows = []
    for done in range(max(steps) + 1):
        obs = observation(lm, obs_size, g)
        if done in steps:  # time the next step on top of `done` observations
            rows.append(measure(name, lm, peer, jcfg, state, history, obs, done, reps))
            print(format_row(rows[-1]), flush=True)
        lm.prefill(state, obs, logits="none")
        history.append(obs)
    return rows


def measure(name, lm, peer, jcfg, state, history, obs, n_steps, reps) -> dict:
    L, past = obs.shape[0], state.length
    whole = torch.cat([*history, obs])

    # reference logits of the new observation: a full pass over history + observation
    t = time.perf_counter()
    state0 = lm.new_state(max_snapshots=1)
    outs = [lm.prefill(state0, whole[s : s + PREFILL_CHUNK], logits="all") for s in range(0, len(whole), PREFILL_CHUNK)]
    reprefill_s = time.perf_counter() - t
    reprefill_logits = torch.cat(outs)[-L:]
    if len(whole) <= FULL_PASS_LIMIT:
        ref = peer(inputs_embeds=whole[None], use_cache=False).logits[0, -L:]
        ref_name = "transformers full pass"
    else:
        ref, ref_name = reprefill_logits, "our re-prefill"

    def ours():
        fork = state.fork()
        t0 = time.perf_counter()
        out = lm.prefill(fork, obs, logits="all")
        return time.perf_counter() - t0, out

    def tf_chunk():
        cache = jamba_cache(state, jcfg)
        t0 = time.perf_counter()
        out = peer(inputs_embeds=obs[None], cache=cache, use_cache=True).logits[0]
        return time.perf_counter() - t0, out

    def tf_token():
        cache = jamba_cache(state, jcfg)
        t0 = time.perf_counter()
        out = [peer(inputs_embeds=obs[None, i : i + 1], cache=cache, use_cache=True).logits[0, 0] for i in range(L)]
        return time.perf_counter() - t0, torch.stack(out)

    t = timed({"ours": ours, "tf-chunk": tf_chunk, "tf-token": tf_token}, reps)
    (ours_s, ours_logits), (chunk_s, chunk_logits), (token_s, token_logits) = t["ours"], t["tf-chunk"], t["tf-token"]
    return {
        "config": name,
        "obs_tokens": L,
        "history_steps": n_steps,
        "history_tokens": past,
        "ms": {"ours": ours_s * 1e3, "tf-token": token_s * 1e3, "tf-chunk": chunk_s * 1e3, "re-prefill": reprefill_s * 1e3},
        "err": {
            "ours": max_err(ours_logits, ref),
            "tf-token": max_err(token_logits, ref),
            "tf-chunk": max_err(chunk_logits, ref),
            "re-prefill": max_err(reprefill_logits, ref),
        },
        "reference": ref_name,
        "gflop": step_flops(lm.config, L, past) / 1e9,
        "state_mb": state.nbytes / 2**20,
        "attention_kv_mb": attention_kv_bytes(lm.config, past) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ------------------------------------------------------------------------------ report
METHODS = ["ours", "tf-token", "tf-chunk", "re-prefill"]
HEADER = (
    "| config | obs | steps | history tok | " + " | ".join(f"{m} ms (err)" for m in METHODS)
    + " | tf-token/ours | tf-chunk/ours | re-prefill/ours | GFLOP | state MB | attn-KV MB | peak RSS MB |"
)


def format_row(r: dict) -> str:
    ms, err = r["ms"], r["err"]
    cells = [f"{ms[m]:.1f} ({err[m]:.0e})" for m in METHODS]
    ratios = [f"{ms[m] / ms['ours']:.1f}x" for m in ("tf-token", "tf-chunk", "re-prefill")]
    return (
        f"| {r['config']} | {r['obs_tokens']} | {r['history_steps']} | {r['history_tokens']} | " + " | ".join(cells)
        + " | " + " | ".join(ratios)
        + f" | {r['gflop']:.2f} | {r['state_mb']:.1f} | {r['attention_kv_mb']:.1f} | {r['peak_rss_mb']:.0f} |"
    )


def summary(rows: list[dict]) -> list[str]:
    """The issue's targets, checked per (config, observation size)."""
    lines = []
    for key in sorted({(r["config"], r["obs_tokens"]) for r in rows}):
        rs = sorted((r for r in rows if (r["config"], r["obs_tokens"]) == key), key=lambda r: r["history_steps"])
        first, last = rs[0], rs[-1]
        growth = last["ms"]["ours"] / first["ms"]["ours"]
        flop_growth = last["gflop"] / first["gflop"]
        lines.append(
            f"- {key[0]}, {key[1]}-token observations: vs tf-token min {min(r['ms']['tf-token'] / r['ms']['ours'] for r in rs):.1f}x; "
            f"vs tf-chunk min {min(r['ms']['tf-chunk'] / r['ms']['ours'] for r in rs):.2f}x; "
            f"vs re-prefill at {last['history_steps']} steps {last['ms']['re-prefill'] / last['ms']['ours']:.0f}x; "
            f"latency growth {first['history_steps']}->{last['history_steps']} steps {growth:.2f}x vs FLOP growth {flop_growth:.2f}x "
            f"(ratio {growth / flop_growth:.2f}); state {last['state_mb']:.1f} MB vs attention KV {last['attention_kv_mb']:.1f} MB "
            f"({last['attention_kv_mb'] / last['state_mb']:.1f}x smaller)"
        )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["config"], r["obs_tokens"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        rs = sorted((r for r in rows if (r["config"], r["obs_tokens"]) == key), key=lambda r: r["history_steps"])
        for m in METHODS:
            ax.plot([r["history_steps"] for r in rs], [r["ms"][m] for r in rs], marker="o", label=m)
        ax.set(xscale="log", yscale="log", xlabel="history (observations)", ylabel="ms per step", title=f"{key[0]}, {key[1]}-token obs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--obs", nargs="+", type=int, default=[40, 144], choices=[40, 144])
    p.add_argument("--steps", nargs="+", type=int, default=[10, 100, 500, 1000])
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds of the timed methods (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/bench/append.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    rows = []
    for name in args.configs:
        for size in args.obs:
            rows += run(name, CONFIGS[name], size, sorted(args.steps), args.reps)
    print("\n".join(summary(rows)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
