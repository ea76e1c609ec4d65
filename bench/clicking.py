"""Can the LLM learn to click from image tokens that say what they show? ClickTarget alone:

    python -m bench.clicking [--steps 600] [--seeds 0 1] [--designs centre near nearest] [--alone-steps 250]
        [--question-first] [--echo] [--name-first] [--second-turn] [--attn-offset 4] [--text] [--lr 2e-3]
        [--text-first 400] [--attend 1.0] [--tower CHECKPOINT [--ideal-labels] [--whiten full]] [--misread 0.5]
        [--misread-centres 0.3] [--transcribe] [--out docs/bench/clicking.json] [--save DIR]

ClickTarget ends in a copy from a place that varies: the centre of the button whose label
the question names. The demo model never learnt it, so this bench takes the vision tower
out of the question. Each pooled image token is what a perfect tower would make of its
cell: a fixed random code per (slot, character) of the cell's slot string, summed, as a
frozen tower whose slots a linear probe reads (``training.tower``). The projector and the
LLM (the embedded config, from a seeded start) then learn the click questions of the
single-image stage ('<image> Click the "Save" button.' -> 'click(x, y)') with the
Trainer's optimiser settings, and are scored on held-out toolbars by whether the greedy
click hits the named button, and by whether the attention layer looks at the named
button's tokens when each button of a toolbar is asked for in turn: a layer blind to the
question looks at the same button whatever is asked, right one time in three. A linear
probe then asks whether that layer's query could follow the question at all: whether what
it reads where the click's first digit is written holds the named label.

The tower's slot design varies (``training.synthetic.cell_slots``):

- ``centre``: a button's label glyphs where they fall, and its centre in the one cell
  that holds the centre (the demo towers before 2026-12-06);
- ``nearest``: every cell also carries the label's first letters and the centre of the
  labelled panel nearest to it (inside it, for the cells it covers), so the key (the
  label) and the value (the centre) sit in the same tokens, and in many of them;
- ``near``: the same, but only in the cells within about half a cell of a panel,
  unless the panel is the screen's only one (the demo recipe's tower).

So does the recipe: ``--alone-steps`` first shows the named button alone (a copy with
nothing to choose), ``--question-first`` puts the question before the image, ``--echo``
has the answer name the button before it clicks ('Save: click(x, y)'), ``--name-first``
inside the click, just before the point ('click("Save", x, y)'), ``--second-turn`` asks a toolbar of
three for another of its buttons after the named one, ``--attn-offset`` moves the
LLM's one attention layer (the embedded config's is at layer 1; Jamba's at 4),
``--text`` shows no image but the toolbar as a line of text (each button's label letters
and centre), which takes the image tokens out of the question too, ``--text-first``
trains that many steps on such text before the images (does a lookup learnt on text
carry over?), and ``--attend`` adds a loss that tells one head where the named button
is (supervised attention, as grounding models supervise a pointer). ``--tower`` puts a
trained checkpoint's frozen tower in the ideal one's place: the same lookup from the
tokens a real tower makes of the toolbar's pixels, and ``--ideal-labels`` adds the ideal
code of each cell's label slots to them (is the label all that the real tokens lack?),
and ``--whiten`` whitens them (are they only badly scaled?).
``--misread`` keeps the ideal tokens but misreads a share of their labels, and
``--misread-centres`` of their centres' digits, to ask how well a tower must read for the
lookup to be learnt. ``--transcribe`` has the answer read the toolbar's buttons out
before it clicks, as ClickTarget's oracle does (``envs.tasks.click_target.read_out``), so
that the lookup happens in text the model wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import string
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bench.copying import learning, over_seeds
from envs.actions import Click, format_action, parse_action
from envs.base import expert_reply
from envs.render import Panel, Screen, hits, render
from envs.tasks.click_target import LABELS, read_out
from model.checkpoint import load_checkpoint, save_checkpoint
from model.default import DEFAULT_CONFIG
from model.llm import Attention
from model.longllava import LongLLaVA
from model.prompt import ASSISTANT_PREFIX, EOS_TOKEN, IMAGE_MARKUP, IMAGE_TOKEN_INDEX, user_turn
from model.tokenizer import ByteTokenizer, tokenize_prompt
from model.vision import preprocess_image
from training.synthetic import (CELL_SLOTS, CENTRE_SLOTS, EVAL_SEED, LABEL_REACH, LABEL_SLOTS, SIZE, cell_slots,
                                centre_code, data_seed, episode, named_alone, screen_questions)

LEARNED = 0.3  # nats per answer token; the plateau is about 0.78 (the digits guessed)
BATCH, WARMUP = 16, 30
TOKENIZER = ByteTokenizer()
SIDE = 6  # the embedded model's 36 pooled tokens
DESIGNS = {"centre": None, "near": LABEL_REACH, "nearest": math.inf}  # -> cell_slots's reach


@dataclass(frozen=True)
class Recipe:
    design: str = "nearest"
    alone_steps: int = 0  # first steps with only the named button on the toolbar
    question_first: bool = False  # the question, then the image
    echo: bool = False  # the answer names the button before it clicks: 'Save: click(x, y)'
    second_turn: bool = False  # a toolbar of three then asks for another of its buttons
    attn_offset: int = DEFAULT_CONFIG.attn_layer_offset
    lr: float = 2e-3
    text: bool = False  # no image: the toolbar as a line of text, 'Save 315,245; Open 612,300; ...'
    name_first: bool = False  # the answer names the button inside the click: 'click("Save", x, y)'
    text_first: int = 0  # first steps with the toolbar as text (three buttons), before any image
    attend: float = 0.0  # weight of a loss that pulls one head's attention onto the named button (``attend_loss``)
    tower: str = ""  # a checkpoint whose frozen vision tower makes the image tokens, instead of ``IdealTower``
    misread: float = 0.0  # the share of cells whose label the ideal tower misreads (``misread``)
    misread_centres: float = 0.0  # the same for the centre's digits
    ideal_labels: bool = False  # with ``tower``: the ideal code of each cell's label slots added to its token
    whiten: str = ""  # with ``tower``: "diagonal" or "full", the real tokens whitened (``whitening``)
    transcribe: bool = False  # the answer lists the toolbar's buttons before it clicks (``read_out``)


@dataclass(frozen=True)
class Toolbar:
    cells: list[str]  # what each pooled token shows
    screen: Screen
    question: str
    answer: str
    target: tuple[int, int, int, int]
    more: tuple[tuple[str, str], ...] = ()  # later (question, answer) turns


def toolbar(seed: int, recipe: Recipe, alone: bool = False) -> Toolbar:
    """A ClickTarget easy episode as the recipe presents it; ``alone`` keeps only the named button."""
    ep = episode("ClickTarget", seed, difficulty="easy")
    screen = named_alone(ep) if alone else ep.screens[0]
    more = ()
    if recipe.second_turn and not alone:
        question, answer = random.Random(seed).choice(screen_questions("ClickTarget", ep, 0)[1:])
        more = ((question, reply(recipe, parse_action(answer), screen)),)
    rng, cells = random.Random(seed), cell_slots(screen, SIDE, DESIGNS[recipe.design])
    cells = misread(cells, recipe.misread, rng, LABEL_SLOTS, string.ascii_letters)
    cells = misread(cells, recipe.misread_centres, rng, CENTRE_SLOTS, string.digits)
    return Toolbar(cells, screen, screen.instruction, reply(recipe, ep.solution, screen), ep.target, more)


def misread(cells: list[str], share: float, rng: random.Random, slots: slice, alphabet: str) -> list[str]:
    """The cells with a ``share`` of those that show something in ``slots`` misread there:
    each character swapped for a random one of ``alphabet`` with even odds. At 0.5 on the
    label slots about half the labels are read whole and three letters in four right, as
    the demo build's tower reads toolbars (``bench.reading``): do the ideal tokens still
    teach the lookup when they read no better?"""
    def swap(c: str) -> str:
        return rng.choice(alphabet) if c != " " and rng.random() < 0.5 else c

    out = []
    for cell in cells:
        shown = cell[slots]
        if shown.strip() and rng.random() < share:
            shown = "".join(map(swap, shown))
        out.append(cell[: slots.start] + shown + cell[slots.stop:])
    return out


def reply(recipe: Recipe, click: Click, screen: Screen) -> str:
    """The answer the recipe trains for a click that names its button ('click("Save", x, y)'):
    with the name inside the click, before it ('Save: click(x, y)'), or not at all; with
    ``transcribe``, after a list of the screen's buttons."""
    if recipe.name_first:
        action = format_action(click)
    else:
        plain = format_action(replace(click, target=""))
        action = f"{click.target}: {plain}" if recipe.echo else plain
    return expert_reply(action, read_out(screen)) if recipe.transcribe else action


class IdealTower(nn.Module):
    """Slot strings to ``[cells, mm_hidden]`` features through a fixed random code."""

    def __init__(self, slots: int, width: int, seed: int = 1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("code", torch.randn(slots, TOKENIZER.vocab_size, width, generator=g) / slots**0.5)

    def forward(self, bar: Toolbar, slots: slice = slice(None)) -> torch.Tensor:
        ids = torch.tensor([TOKENIZER.encode(c) for c in bar.cells])  # [cells, slots]
        picked = torch.arange(ids.shape[1])[slots]
        return self.code[picked, ids[:, slots]].sum(1)


class RealTower(nn.Module):
    """A trained checkpoint's vision tower, frozen: the toolbar's pixels to ``[cells, mm_hidden]``;
    with ``labels``, plus the ideal tower's code of each cell's label slots (are the labels
    what the real tokens lack?)."""

    def __init__(self, recipe: Recipe, labels: IdealTower | None = None):
        super().__init__()
        self.model = load_checkpoint(recipe.tower).float().eval().requires_grad_(False)
        self.labels = labels
        self.shift, self.scale = 0.0, None
        if recipe.whiten:  # fit on 200 training toolbars' tokens
            tokens = torch.cat([self(toolbar(data_seed(9, s), recipe)) for s in range(200)])
            self.shift, self.scale = whitening(tokens, recipe.whiten)

    @torch.no_grad()
    def forward(self, bar: Toolbar) -> torch.Tensor:
        pixels = preprocess_image(Image.fromarray(render(bar.screen, SIZE, SIZE)), self.model.config)
        tokens = self.model.vision(pixels[None])[0]
        if self.scale is not None:
            tokens = (tokens - self.shift) @ self.scale
        return tokens if self.labels is None else tokens + self.labels(bar, LABEL_SLOTS)


def whitening(tokens: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The shift and ``[width, width]`` map that give ``tokens`` zero mean and unit variance
    per feature (``diagonal``) or an identity covariance (``full``, PCA whitening): the
    ideal tower's tokens are isotropic, the real ones' variance sits in a few directions."""
    mean = tokens.mean(0)
    if how == "diagonal":
        return mean, torch.diag(1 / (tokens.std(0) + 1e-4))
    values, vectors = torch.linalg.eigh(torch.cov((tokens - mean).T))
    return mean, vectors @ torch.diag(values.clamp_min(1e-4 * values.max()) ** -0.5) @ vectors.T


def prompt_ids(bar: Toolbar, recipe: Recipe) -> list[int]:
    shown = as_text(bar.cells) if recipe.text else IMAGE_MARKUP
    text = f"{bar.question}\n{shown}" if recipe.question_first else f"{shown}\n{bar.question}"
    return tokenize_prompt(TOKENIZER, user_turn(text) + ASSISTANT_PREFIX)


def prompt_embeds(model: LongLLaVA, tower: IdealTower | RealTower, bar: Toolbar, recipe: Recipe) -> torch.Tensor:
    if recipe.text:
        return model.llm.embed_tokens(torch.tensor(prompt_ids(bar, recipe)))
    return model.embed(prompt_ids(bar, recipe), model.projector(tower(bar))[None])


def as_text(cells: list[str]) -> str:
    """The buttons that the cells name, in reading order: 'Undo 669,295; Rena 264,802'."""
    named = dict.fromkeys((cell[LABEL_SLOTS].strip(), cell[CENTRE_SLOTS]) for cell in cells)
    return "; ".join(f"{label} {centre[:3]},{centre[3:]}" for label, centre in named if label)


def batch(model, tower, rng: random.Random, recipe: Recipe, alone: bool):
    """``BATCH`` training toolbars (seeds below ``EVAL_SEED``), right-padded: embeddings,
    labels, and (with ``recipe.attend``) the (query, key) positions that ``attend_loss`` pairs."""
    rows, pairs = [], []
    for i in range(BATCH):
        bar = toolbar(data_seed(9, rng.randrange(50_000)), recipe, alone)
        prompt = prompt_embeds(model, tower, bar, recipe)
        if recipe.attend and not recipe.text:
            pairs += [(i, q, k) for q, k in _lookups(bar, recipe, prompt.shape[0])]
        ids = tokenize_prompt(TOKENIZER, bar.answer + EOS_TOKEN)
        labels = [-100] * prompt.shape[0] + ids
        for question, answer in bar.more:
            asked = tokenize_prompt(TOKENIZER, user_turn(question) + ASSISTANT_PREFIX)
            answered = tokenize_prompt(TOKENIZER, answer + EOS_TOKEN)
            ids, labels = ids + asked + answered, labels + [-100] * len(asked) + answered
        rows.append((torch.cat([prompt, model.llm.embed_tokens(torch.tensor(ids))]), labels[1:] + [-100]))
    width = max(e.shape[0] for e, _ in rows)
    embeds = torch.stack([F.pad(e, (0, 0, 0, width - e.shape[0])) for e, _ in rows])
    labels = torch.full((BATCH, width), -100)
    for i, (_, row) in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row)  # position t predicts t + 1
    return embeds, labels, pairs


def _lookups(bar: Toolbar, recipe: Recipe, prompt_length: int) -> list[tuple[int, list[int]]]:
    """The positions that write the click's point, each with the image positions of the
    named button (the cells that hold its label and centre)."""
    start = prompt_ids(bar, recipe).index(IMAGE_TOKEN_INDEX)
    keys = [start + c for c, cell in enumerate(bar.cells)
            if cell[CENTRE_SLOTS] == centre_code(bar.target) and cell[LABEL_SLOTS].strip()]
    first_digit = point_start(bar.answer)
    return [(prompt_length + b - 1, keys) for b in range(first_digit, len(bar.answer) - 1)] if keys else []


def point_start(answer: str) -> int:
    """Where the click's point begins in ``answer``: its first digit."""
    return re.search(r"click\(\D*", answer).end()


def attend_loss(attn: Attention, x: torch.Tensor, pairs: list[tuple[int, int, list[int]]]) -> torch.Tensor:
    """Supervised attention: at each position that writes the point, minus the log of the
    share of head 0's attention on the named button's tokens, averaged over ``pairs`` (row,
    position, positions). ``x [batch, L, hidden]`` is what the attention layer reads."""
    q, k, _ = attn._qkv(x)
    rows, queries = torch.tensor([i for i, _, _ in pairs]), torch.tensor([t for _, t, _ in pairs])
    scores = (q[rows, 0, queries].unsqueeze(1) @ k[rows, 0].transpose(1, 2)).squeeze(1) / attn.head_dim**0.5
    future = torch.arange(x.shape[1])[None] > queries[:, None]
    weights = torch.softmax(scores.masked_fill(future, -torch.inf), -1)
    named = torch.zeros_like(weights, dtype=torch.bool)
    for p, (_, _, keys) in enumerate(pairs):
        named[p, keys] = True
    return -torch.log((weights * named).sum(-1) + 1e-6).mean()


def each_button(k: int, recipe: Recipe) -> list[Toolbar]:
    """Held-out toolbar ``k`` asked for each of its buttons in turn, the named one first."""
    seed = EVAL_SEED + 500 + k
    bar, ep = toolbar(seed, recipe), episode("ClickTarget", seed, difficulty="easy")
    panels = [e for e in ep.screens[0].elements if isinstance(e, Panel) and e.label]
    asked = screen_questions("ClickTarget", ep, 0)
    return [replace(bar, question=q, answer=reply(recipe, parse_action(a), bar.screen), target=p.box)
            for (q, a), p in zip(asked, panels, strict=True)]


@torch.no_grad()
def clicks(model: LongLLaVA, tower: IdealTower | RealTower, recipe: Recipe, n: int = 20) -> dict[str, float]:
    """Greedy answers to every question of ``n`` held-out toolbars (one per button): the
    share whose click hits the named button, that lands on another of the toolbar's
    buttons instead, and that names the asked button; and the distinct points clicked per
    toolbar, which is 1 when the click ignores the question and 3 when it follows it."""
    hit = other = named = distinct = 0
    for k in range(n):
        points = set()  # where the clicks land: a name that changes with the question is not a choice
        bars = each_button(k, recipe)
        for bar in bars:
            embeds, out = prompt_embeds(model, tower, bar, recipe), []
            for _ in range(96 if recipe.transcribe else 32):
                out.append(int(model.llm.head(model.llm.forward_batch(embeds[None]))[0, -1].argmax()))
                if out[-1] == DEFAULT_CONFIG.eos_token_id:
                    break
                embeds = torch.cat([embeds, model.llm.embed_tokens(torch.tensor(out[-1:]))])
            answer = TOKENIZER.decode(out, skip_special=True).split("\n")[-1].split(": ")[-1]
            action = parse_action(answer)
            if isinstance(action, Click):
                hit += hits(bar.target, action, SIZE, SIZE)
                other += any(hits(b.target, action, SIZE, SIZE) for b in bars if b.target != bar.target)
                named += f'"{action.target}"' in bar.question
            points.add((action.x, action.y) if isinstance(action, Click) else answer)
        distinct += len(points)
    asked = 3 * n
    return {"hit_rate": hit / asked, "other_button_rate": other / asked, "names_asked_rate": named / asked,
            "distinct_clicks": distinct / n}


@torch.no_grad()
def attention_follows(model: LongLLaVA, tower: IdealTower | RealTower, recipe: Recipe, n: int = 20) -> float:
    """Does the attention layer look at the button that the question names?

    At the last prompt position (it writes the answer's first token), a head's pick is the
    button whose tokens (those holding its centre) take most of the head's attention.
    Returns the best head's share of picks, over every question of ``n`` held-out
    toolbars, that are the named button: a head blind to the question picks the same
    button whatever is asked, so it is right 1 time in 3.
    """
    layer = model.llm.layers[recipe.attn_offset]
    inputs = []  # what the attention layer reads: its input norm's output
    hook = layer.input_layernorm.register_forward_hook(lambda module, args, out: inputs.append(out[0]))
    right = torch.zeros(layer.self_attn.heads)
    try:
        for k in range(n):
            for bar in each_button(k, recipe):
                inputs.clear()
                model.llm.forward_batch(prompt_embeds(model, tower, bar, recipe)[None])
                start = prompt_ids(bar, recipe).index(IMAGE_TOKEN_INDEX)
                picks = _picks(layer.self_attn, inputs[0], range(start, start + len(bar.cells)), bar.cells)
                right += torch.tensor([pick == centre_code(bar.target) for pick in picks])
    finally:
        hook.remove()
    return right.max().item() / (3 * n)


def _picks(attn: Attention, x: torch.Tensor, image: range, cells: list[str]) -> list[str]:
    """Per head: the centre slots of the cells that the last position attends to most."""
    q, k, _ = attn._qkv(x[None])
    k = k[0, :, image.start : image.stop].repeat_interleave(attn.heads // attn.kv_heads, 0)
    weights = torch.softmax(q[0, :, -1:] @ k.transpose(1, 2) / attn.head_dim**0.5, -1)[:, 0]
    groups = sorted({cell[CENTRE_SLOTS] for cell in cells})
    member = torch.tensor([[cell[CENTRE_SLOTS] == g for g in groups] for cell in cells], dtype=weights.dtype)
    return [groups[i] for i in (weights @ member).argmax(1).tolist()]


@torch.no_grad()
def query_holds_label(model: LongLLaVA, tower: IdealTower | RealTower, recipe: Recipe, n: int = 200) -> float:
    """Can the attention layer's query know which button is named?

    At the position that writes the click's first digit (the answer fed up to it),
    a linear probe reads the named label (one of ``LABELS``) from what the attention layer
    reads there (its input norm's output). It is fit on three quarters of the questions of
    ``n`` held-out toolbars and scored on the rest: 5% is chance, a query with nothing to
    match the buttons' labels against.
    """
    inputs = []
    hook = model.llm.layers[recipe.attn_offset].input_layernorm.register_forward_hook(
        lambda module, args, out: inputs.append(out[0, -1]))
    try:
        named = []
        for k in range(n):
            for bar in each_button(k, recipe):
                fed = tokenize_prompt(TOKENIZER, bar.answer[: point_start(bar.answer)])
                model.llm.forward_batch(torch.cat([prompt_embeds(model, tower, bar, recipe),
                                                   model.llm.embed_tokens(torch.tensor(fed))])[None])
                named.append(LABELS.index(bar.question.split('"')[1]))
    finally:
        hook.remove()
    return _probe(torch.stack(inputs), torch.tensor(named), len(LABELS))


def _probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 400) -> float:
    """Held-out accuracy of a logistic regression fit on the first three quarters of (x, y)."""
    fit = len(y) * 3 // 4
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = nn.Linear(x.shape[1], classes)
        optimizer = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-3)
        for _ in range(steps):
            loss = F.cross_entropy(probe(x[:fit]), y[:fit])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return (probe(x[fit:]).argmax(1) == y[fit:]).float().mean().item()


def train(recipe: Recipe, steps: int, seed: int, save: Path | None = None) -> dict:
    torch.manual_seed(seed)
    model = LongLLaVA(DEFAULT_CONFIG.model_copy(update={"attn_layer_offset": recipe.attn_offset}))
    ideal = IdealTower(CELL_SLOTS, DEFAULT_CONFIG.mm_hidden_size)
    tower = RealTower(recipe, ideal if recipe.ideal_labels else None) if recipe.tower else ideal
    params = [*model.projector.parameters(), *model.llm.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr)
    rng, losses, began = random.Random(seed), [], time.perf_counter()
    layer, read, attended = model.llm.layers[recipe.attn_offset], [], []  # what the attention layer reads
    if recipe.attend:
        layer.input_layernorm.register_forward_hook(
            lambda module, args, out: read.append(out) if module.training else None)
    for step in range(1, steps + 1):
        optimizer.param_groups[0]["lr"] = recipe.lr * min(1.0, step / WARMUP)
        shown = replace(recipe, text=True) if step <= recipe.text_first else recipe
        alone = recipe.text_first < step <= recipe.text_first + recipe.alone_steps
        embeds, labels, pairs = batch(model, tower, rng, shown, alone)
        read.clear()
        logits = model.llm.head(model.llm.forward_batch(embeds))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        total = loss
        if pairs:
            attend = attend_loss(layer.self_attn, read[0], pairs)
            total = loss + recipe.attend * attend
            attended.append(attend.item())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"{recipe} seed {seed} step {step}: loss {statistics.fmean(losses[-50:]):.3f}", flush=True)
    learned, final = learning(losses, LEARNED)
    if save:
        save_checkpoint(model, save / f"{recipe.design}-seed{seed}")
    scores = clicks(model.eval(), tower, recipe)
    return {**asdict(recipe), "seed": seed, "steps": steps, "seconds": round(time.perf_counter() - began, 1),
            "learned_at": learned, "final_loss": final, **scores,
            "attention_follows": None if recipe.text else attention_follows(model, tower, recipe),
            "query_holds_label": query_holds_label(model, tower, recipe),
            "losses": [round(v, 4) for v in losses], "attend_losses": [round(v, 4) for v in attended]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clicking", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--designs", nargs="+", choices=list(DESIGNS), default=list(DESIGNS))
    parser.add_argument("--alone-steps", type=int, default=0, help="first steps with only the named button shown")
    parser.add_argument("--question-first", action="store_true")
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--name-first", action="store_true", help='answer click("Save", x, y)')
    parser.add_argument("--second-turn", action="store_true")
    parser.add_argument("--text", action="store_true", help="the toolbar as a line of text, with no image")
    parser.add_argument("--attn-offset", type=int, default=DEFAULT_CONFIG.attn_layer_offset)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--text-first", type=int, default=0, help="first steps with the toolbar as text")
    parser.add_argument("--attend", type=float, default=0.0, help="weight of the supervised-attention loss")
    parser.add_argument("--tower", default="", help="a checkpoint whose frozen tower makes the image tokens")
    parser.add_argument("--misread", type=float, default=0.0, help="the share of cells whose label is misread")
    parser.add_argument("--misread-centres", type=float, default=0.0, help="the same for the centre's digits")
    parser.add_argument("--ideal-labels", action="store_true", help="with --tower: add the ideal labels' code")
    parser.add_argument("--whiten", choices=["diagonal", "full"], default="", help="with --tower: whiten its tokens")
    parser.add_argument("--transcribe", action="store_true", help="the answer lists the buttons before it clicks")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--save", type=Path, help="a folder for the trained models (the LongLLaVA layout)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    recipes = [Recipe(design, args.alone_steps, args.question_first, args.echo, args.second_turn, args.attn_offset,
                      args.lr, args.text, args.name_first, args.text_first, args.attend, args.tower,
                      args.misread, args.misread_centres, args.ideal_labels, args.whiten,
                      args.transcribe)
               for design in args.designs]
    rows = [train(recipe, args.steps, seed, args.save) for recipe in recipes for seed in args.seeds]
    print(f"| recipe | seeds with loss < {LEARNED} | at step (median) | final loss (median) | held-out clicks that hit "
          "| distinct clicks per toolbar (blind: 1, following: 3) | attention picks the named button (blind: 33%) "
          "| the query holds the named label (chance: 5%) |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in recipes:
        runs = [r for r in rows if r["design"] == recipe.design]
        hit, distinct, query = (statistics.median(r[key] for r in runs)
                                for key in ("hit_rate", "distinct_clicks", "query_holds_label"))
        follows = "" if recipe.text else f"{statistics.median(r['attention_follows'] for r in runs):.0%}"
        print(f"| {recipe} | {over_seeds(runs)} | {hit:.0%} | {distinct:.2f} | {follows} | {query:.0%} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
