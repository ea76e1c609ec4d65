"""Can the LLM learn to copy? The smallest skill the demo tasks need, measured alone:

    python -m bench.copying [--steps 600] [--seeds 0 1 2] [--variants 1 3] [--out docs/bench/copying.json]

RecallCode and ClickTarget both end in a copy: the access code, or a button's centre,
from where it was seen into the action. Here the code is given as text, in the chat
format the stages train on with the loss on the answer only ("The access code is W3A3.
What is the access code?" -> "W3A3"), so nothing depends on the vision tower: a model
that cannot learn this cannot learn it from image tokens either.

Every variant trains from a seeded start on the same batches with the Trainer's
optimiser settings (AdamW, warm-up, gradient clipping at 1, the demo recipe's learning
rate, then constant), and is scored by its loss curve, the first step at which the
loss (mean of the last 50 steps) is below ``LEARNED``, and greedy exact match on
held-out codes. A model that has not learnt to copy sits at chance: about
(4 ln 24) / 5 = 2.54 nats per answer token (four code characters, then EOS).

Whether and when the hybrid learns it varies with the seed (the start and the batches'
order) far more than between variants, so each variant runs over ``--seeds`` and the
table gives how many of them learnt and their median step.

The peer is a plain transformer of the same width and depth with learned positions
(``transformers``' GPT-2), which shows how fast the task is learnable at all.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from envs.tasks.recall_code import ALPHABET
from model.default import DEFAULT_CONFIG
from model.llm import HybridLM
from model.prompt import ASSISTANT_PREFIX, EOS_TOKEN, user_turn
from model.tokenizer import ByteTokenizer, tokenize_prompt

LEARNED = 1.0  # nats per answer token; chance is 2.54, a copying model goes to ~0
# "the embedded config" of the variants below: the embedded model's when this bench was run
# (2026-12-02), with attention at layer 4 and 16 Mamba states, so its recorded results still hold
BASE = DEFAULT_CONFIG.model_copy(update=dict(attn_layer_offset=4, mamba_d_state=16))
BATCH, LR, WARMUP = 16, 2e-3, 30
TOKENIZER = ByteTokenizer()


def sample(rng: random.Random) -> tuple[list[int], list[int], str]:
    """One question's prompt ids, its answer ids (EOS last) and the code."""
    code = "".join(rng.choice(ALPHABET) for _ in range(4))
    prompt = tokenize_prompt(TOKENIZER, user_turn(f"The access code is {code}. What is the access code?") + ASSISTANT_PREFIX)
    return prompt, tokenize_prompt(TOKENIZER, code + EOS_TOKEN), code


def batch(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """``BATCH`` samples, right-padded: ids and labels (-100 outside the answers)."""
    rows = [sample(rng)[:2] for _ in range(BATCH)]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros(BATCH, width, dtype=torch.long)
    labels = torch.full((BATCH, width), -100)
    for i, (prompt, answer) in enumerate(rows):
        ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    return ids, labels


# ----------------------------------------------------------------------------- models
class Hybrid(nn.Module):
    """The project's LLM (``model.llm.HybridLM``), as the stages train it; ``jamba_init``
    puts every projection outside the Mamba mixers at N(0, 0.02), as Jamba does (and as
    this project did until ``bench/copying.py`` measured what it costs at this width)."""

    def __init__(self, updates: dict):
        super().__init__()
        jamba_init = updates.pop("jamba_init", False)
        self.lm = HybridLM(BASE.model_copy(update=updates))
        if jamba_init:
            with torch.no_grad():
                for name, module in self.lm.named_modules():
                    if isinstance(module, nn.Linear) and ".mamba." not in f".{name}.":
                        module.weight.normal_(0.0, 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(self.lm.forward_batch(self.lm.embed_tokens(ids)))


class Transformer(nn.Module):
    """The peer: GPT-2 with learned positions, at the embedded model's width and depth."""

    def __init__(self, updates: dict):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        c = BASE
        self.lm = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=256, n_embd=c.hidden_size,
                                             n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                                             bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, **updates))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[dict], nn.Module]
    updates: dict = field(default_factory=dict)
    adam_beta2: float = 0.999  # PyTorch's default, which the Trainer uses; LLMs often train with 0.95


VARIANTS = (
    Variant("hybrid, the embedded config, Jamba's N(0, 0.02) init", Hybrid, dict(jamba_init=True)),
    Variant("hybrid, the embedded config", Hybrid),
    Variant("hybrid, d_state 8, expand 1", Hybrid, dict(mamba_d_state=8, mamba_expand=1)),
    Variant("transformer (GPT-2, learned positions)", Transformer),
    Variant("hybrid, d_state 8, expand 1, Adam beta2 0.95", Hybrid, dict(mamba_d_state=8, mamba_expand=1), adam_beta2=0.95),
    Variant("hybrid, d_state 8, expand 1, tied embeddings", Hybrid, dict(mamba_d_state=8, mamba_expand=1, tie_word_embeddings=True)),
    # where the one attention layer sits (Jamba's and the embedded config's: layer 4 of 8)
    Variant("hybrid, d_state 8, expand 1, attention at layer 1", Hybrid, dict(mamba_d_state=8, mamba_expand=1, attn_layer_offset=1)),
    Variant("hybrid, d_state 8, expand 1, attention at layer 7", Hybrid, dict(mamba_d_state=8, mamba_expand=1, attn_layer_offset=7)),
    Variant("hybrid, the embedded config, attention at layer 1", Hybrid, dict(attn_layer_offset=1)),
)


# ----------------------------------------------------------------------------- runs
@torch.no_grad()
def exact_match(model: nn.Module, n: int = 40, seed: int = 1_000_000) -> float:
    rng, right = random.Random(seed), 0
    for _ in range(n):
        prompt, _, code = sample(rng)
        ids = list(prompt)
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        right += TOKENIZER.decode(ids[len(prompt):]).startswith(code)
    return right / n


def train(variant: Variant, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = variant.build(dict(variant.updates))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, variant.adam_beta2))
    rng, losses, began = random.Random(seed), [], time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.param_groups[0]["lr"] = LR * min(1.0, step / WARMUP)
        ids, labels = batch(rng)
        logits = model(ids)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - began
    learned, final = learning(losses, LEARNED)
    return {"variant": variant.name, "seed": seed, "params": sum(p.numel() for p in model.parameters()), "steps": steps,
            "seconds": round(seconds, 1), "learned_at": learned, "final_loss": final,
            "exact_match": exact_match(model.eval()), "losses": [round(v, 4) for v in losses]}


def learning(losses: list[float], threshold: float) -> tuple[int | None, float]:
    """The first step whose loss (mean of the last 50 steps) is below ``threshold``, and the final such mean."""
    smooth = [statistics.fmean(losses[max(0, k - 49): k + 1]) for k in range(len(losses))]
    return next((k + 1 for k, v in enumerate(smooth) if v < threshold), None), round(smooth[-1], 3)


def over_seeds(runs: list[dict]) -> str:
    """Table cells for one variant's runs: how many seeds learnt, their median step, the median final loss."""
    learned = [r["learned_at"] for r in runs if r["learned_at"] is not None]
    return (f"{len(learned)} of {len(runs)} | {statistics.median(learned) if learned else 'never'} "
            f"| {statistics.median(r['final_loss'] for r in runs):.2f}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(dict.fromkeys(row["variant"] for row in rows))  # one colour per variant, a line per seed
    labelled = set()
    for row in rows:
        curve, name = row["losses"], row["variant"]
        ax.plot([statistics.fmean(curve[max(0, k - 19): k + 1]) for k in range(len(curve))], lw=1.0,
                color=f"C{names.index(name)}", label=None if name in labelled else name)
        labelled.add(name)
    ax.axhline(2.54, color="grey", ls=":", lw=1, label="chance (no copying)")
    ax.set(xlabel="optimizer step (16 questions each)", ylabel="loss per answer token", ylim=(0, 4))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.copying", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", type=int, nargs="+", help=f"which to run, 0 to {len(VARIANTS) - 1} (default: all)")
    parser.add_argument("--out", type=Path, help="a JSON file; a PNG of the loss curves goes beside it")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    chosen = [VARIANTS[i] for i in args.variants] if args.variants else list(VARIANTS)
    rows = []
    for variant in chosen:
        for seed in args.seeds:
            rows.append(train(variant, args.steps, seed))
            print(f"{variant.name}, seed {seed}: learned at {rows[-1]['learned_at']}, final loss {rows[-1]['final_loss']}", flush=True)
    print(f"| variant | parameters | s / {args.steps} steps | seeds with loss < {LEARNED} | at step (median) | final loss (median) | exact match (median) |")
    print("|---|---|---|---|---|---|---|")
    for variant in chosen:
        runs = [r for r in rows if r["variant"] == variant.name]
        print(f"| {variant.name} | {runs[0]['params'] / 1e6:.2f} M | {statistics.median(r['seconds'] for r in runs):.0f} "
              f"| {over_seeds(runs)} | {statistics.median(r['exact_match'] for r in runs):.0%} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        plot(rows, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
