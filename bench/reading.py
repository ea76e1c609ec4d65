"""Does a model read its screens? Three probes on held-out screens (seeds from ``EVAL_SEED``):

    python -m bench.reading [--model DIR] [--screens 200] [--questions 40] [--recall-spans 3 16 50] [--out FILE.json]

1. **The tower's tokens.** A linear ``training.tower.SlotHead`` is fitted on the frozen
   tower's pooled tokens of training-seed screens (access codes and toolbars), then
   scores held-out ones: glyph slots right, access codes read whole, button-centre digits
   right, the nearest panel's label letters right, and the glyph and label slots of the
   toolbars alone (white button text on colour), with the share of a toolbar's cells that
   read their button's label whole (all four letters), which a lookup by name needs. This
   says whether the text is in the image tokens at all. It also counts the codes' layouts
   (which glyph slots they fill): one, since the code panel is monospace.
2. **The whole model.** Single-screen questions in the training format, answered
   greedily: the access code (right or not), and each held-out toolbar asked for every
   one of its buttons in turn, then for the named one shown alone. For the clicks: the
   share that hit the asked button, that land on another of its buttons instead, and that
   name the asked button (``click("Save", x, y)``); the distinct points a toolbar's
   questions get (1 when the click ignores which button is asked, 3 when it follows it);
   and the lone button's hits (the copy of a centre, with nothing to choose). This says
   whether the LLM reads the tokens, and where a click goes wrong.
3. **Recall across screens** (``--recall-spans``): held-out access codes asked that many
   screens after they were shown, in the ``recall`` run's multi-screen format, without
   the rollouts that ``envs.rollout`` needs (so it also scores models before trajectory
   fine-tuning). A copy that fades with distance falls with the span.

A model whose tower reads but whose answers do not has its bottleneck in the LLM.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from envs.actions import Click, parse_action
from envs.render import Panel, Screen, hits, render
from model.checkpoint import load_checkpoint
from model.default import default_model
from model.longllava import LongLLaVA
from model.prompt import ASSISTANT_PREFIX, IMAGE_MARKUP, user_turn
from model.tokenizer import ByteTokenizer, tokenize_prompt
from model.vision import preprocess_image
from training.pipeline import EVAL_SEED
from training.loss import image_features
from training.synthetic import (CENTRE_SLOTS, EMPTY, GLYPH_SLOTS, LABEL_SLOTS, SIZE, cell_slots, episode, named_alone,
                                screen_questions)
from training.tower import SlotHead, slot_targets

CODE_ROW = slice(18, 24)  # the cells of the access code's row on a 6x6 grid
CLICK_TOKENS = 96  # a toolbar's three buttons read out, then the longest named click, click("Refresh", 999, 999)


def picture(screen: Screen) -> Image.Image:
    return Image.fromarray(render(screen, SIZE, SIZE))


def first_screens(n: int, seed: int):
    """``n`` first screens, alternately an access code and a toolbar, with their episodes."""
    for k in range(n):
        task, kwargs = ("RecallCode", {"memory_span": 2}) if k % 2 == 0 else ("ClickTarget", {})
        ep = episode(task, seed + k, difficulty="easy", **kwargs)
        yield task, ep, picture(ep.screens[0])


@torch.no_grad()
def tokens_and_slots(model: LongLLaVA, n: int, seed: int, tokenizer: ByteTokenizer):
    side = int(model.config.image_tokens ** 0.5)
    rows = list(first_screens(n, seed))
    pixels = torch.stack([preprocess_image(image, model.config) for _, _, image in rows])
    features = torch.cat([model.vision(pixels[i: i + 50]) for i in range(0, n, 50)])
    targets = torch.stack([slot_targets(cell_slots(ep.screens[0], side), tokenizer) for _, ep, _ in rows])
    return features, targets, [task for task, _, _ in rows]


def probe_tower(model: LongLLaVA, train: int, test: int, steps: int = 600) -> dict:
    tokenizer = ByteTokenizer()
    empty = tokenizer.encode(EMPTY)[0]
    x, y, _ = tokens_and_slots(model, train, 0, tokenizer)
    x_test, y_test, tasks = tokens_and_slots(model, test, EVAL_SEED, tokenizer)
    torch.manual_seed(0)
    head = SlotHead(x.shape[-1], tokenizer.vocab_size)
    optimizer = torch.optim.Adam(head.parameters(), 3e-3)
    for _ in range(steps):
        pick = torch.randint(len(x), (64,))
        weights = 1.0 + 4.0 * (y[pick] != empty)
        loss = F.cross_entropy(head(x[pick]).flatten(0, 2), y[pick].flatten(), reduction="none")
        optimizer.zero_grad()
        ((loss * weights.flatten()).sum() / weights.sum()).backward()
        optimizer.step()
    with torch.no_grad():
        right = head(x_test).argmax(-1) == y_test
    shows = y_test != empty
    shown = [i for i, task in enumerate(tasks) if task == "RecallCode"]
    toolbars = [i for i, task in enumerate(tasks) if task == "ClickTarget"]
    codes = [bool(right[i, CODE_ROW, :GLYPH_SLOTS].all()) for i in shown]
    layouts = {tuple(shows[i, CODE_ROW, :GLYPH_SLOTS].flatten().tolist()) for i in shown}

    def share(slots: slice, screens: list[int] | slice = slice(None)) -> float:
        """Of the slots that show something on these screens, the share read right."""
        hit, show = right[screens][..., slots], shows[screens][..., slots]
        return (hit & show).sum().item() / max(1, show.sum().item())

    def whole(slots: slice, screens: list[int]) -> float:
        """Of the cells that show something in these slots, the share with all of them read right."""
        hit, named = right[screens][..., slots].all(-1), shows[screens][..., slots].any(-1)
        return (hit & named).sum().item() / max(1, named.sum().item())

    return {
        "code_layouts": len(layouts),
        "glyph_slots": share(slice(0, GLYPH_SLOTS)),
        "codes_whole": sum(codes) / len(codes),
        "centre_digits": share(CENTRE_SLOTS),
        "label_letters": share(LABEL_SLOTS),
        "toolbar_glyphs": share(slice(0, GLYPH_SLOTS), toolbars),
        "toolbar_labels": share(LABEL_SLOTS, toolbars),
        "toolbar_labels_whole": whole(LABEL_SLOTS, toolbars),
    }


@torch.no_grad()
def answer(model: LongLLaVA, images: list[Image.Image], question: str, tokenizer: ByteTokenizer,
           max_new: int = 16) -> str:
    """A greedy answer to a question on one or more screens, in the training format."""
    ids = tokenize_prompt(tokenizer, user_turn(f"{IMAGE_MARKUP}\n" * len(images) + question) + ASSISTANT_PREFIX)
    features = image_features(model, torch.stack([preprocess_image(image, model.config) for image in images]))
    eos, out = set(model.config.eos_token_ids), []
    for _ in range(max_new):
        hidden = model.llm.forward_batch(model.embed(ids + out, features)[None], False)
        token = int(model.llm.lm_head(hidden[0, -1]).argmax())
        if token in eos:
            break
        out.append(token)
    return tokenizer.decode(out)


def probe_answers(model: LongLLaVA, n: int) -> dict:
    tokenizer = ByteTokenizer()
    codes = 0
    for k in range(n):
        ep = episode("RecallCode", EVAL_SEED + k, difficulty="easy", memory_span=2)
        codes += answer(model, [picture(ep.screens[0])], "What is the access code?", tokenizer) == ep.solution.text
    return {"codes_answered": codes / n} | probe_clicks(model, n, tokenizer)


def clicked_at(reply: str):
    """The action on a reply's last line: the click after the buttons read out (``envs.base.expert_reply``)."""
    return parse_action(reply.rsplit("\n", 1)[-1])


def probe_clicks(model: LongLLaVA, n: int, tokenizer: ByteTokenizer) -> dict:
    """``n`` held-out toolbars, each asked for every button in turn, then for the named one alone."""
    hit = other = named = distinct = alone = asked = 0
    for k in range(n):
        ep = episode("ClickTarget", EVAL_SEED + 500 + k, difficulty="easy")
        screen = ep.screens[0]
        buttons = [e for e in screen.elements if isinstance(e, Panel) and e.label]
        points = set()
        for button, (question, _) in zip(buttons, screen_questions("ClickTarget", ep, 0), strict=True):
            action = clicked_at(answer(model, [picture(screen)], question, tokenizer, CLICK_TOKENS))
            clicked = isinstance(action, Click)
            hit += clicked and hits(button.box, action, SIZE, SIZE)
            other += clicked and any(hits(b.box, action, SIZE, SIZE) for b in buttons if b is not button)
            named += clicked and action.target == button.label
            if clicked:  # an answer that is no click lands nowhere, and is no choice either
                points.add((action.x, action.y))
        asked += len(buttons)
        distinct += len(points)
        lone = named_alone(ep)
        action = clicked_at(answer(model, [picture(lone)], lone.instruction, tokenizer, CLICK_TOKENS))
        alone += isinstance(action, Click) and hits(ep.target, action, SIZE, SIZE)
    return {"clicks_hit": hit / asked, "clicks_other_button": other / asked, "clicks_name_asked": named / asked,
            "distinct_points": distinct / n, "alone_hit": alone / n}


def probe_recall(model: LongLLaVA, n: int, spans: list[int]) -> dict:
    """``n`` held-out access codes asked ``span`` screens after they were shown, in the
    ``recall`` run's multi-screen format: the share typed right at each span. A copy that
    fades with distance falls with the span; a lookup by attention, which has no positions
    here, does not."""
    tokenizer, out = ByteTokenizer(), {}
    for span in spans:
        right = 0
        for k in range(n):
            ep = episode("RecallCode", EVAL_SEED + 7_000 + k, difficulty="easy", memory_span=span)
            reply = answer(model, [picture(s) for s in ep.screens], ep.screens[-1].instruction, tokenizer)
            right += reply == ep.reply()
        out[f"recall_{span}"] = right / n
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reading", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a checkpoint directory (default: the embedded model)")
    parser.add_argument("--screens", type=int, default=200, help="held-out screens for the tower probe")
    parser.add_argument("--questions", type=int, default=40,
                        help="held-out access codes, and toolbars asked for each button (0: the tower alone)")
    parser.add_argument("--recall-spans", type=int, nargs="*", default=[],
                        help="also ask --questions codes this many screens after they were shown")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = (load_checkpoint(args.model) if args.model else default_model()).float().eval()
    result = probe_tower(model, 6 * args.screens, args.screens)
    if args.questions:
        result |= probe_answers(model, args.questions) | probe_recall(model, args.questions, args.recall_spans)
    columns = {"code_layouts": "code layouts (slots used)", "glyph_slots": "glyph slots (linear probe)",
               "codes_whole": "codes whole (probe)",
               "centre_digits": "centre digits (probe)", "label_letters": "nearest label's letters (probe)",
               "toolbar_glyphs": "glyph slots, toolbars only", "toolbar_labels": "label letters, toolbars only",
               "toolbar_labels_whole": "labels whole (all four letters), toolbars only",
               "codes_answered": "codes answered", "clicks_hit": "clicks hit the asked button",
               "clicks_other_button": "land on another button", "clicks_name_asked": "name the asked button",
               "distinct_points": "distinct points per toolbar (of 3)", "alone_hit": "lone button hit"}
    print("| " + " | ".join(columns.get(k) or f"code typed {k[7:]} screens on" for k in result) + " |")
    print("|" + "---|" * len(result))
    print("| " + " | ".join(f"{v:.2f}" if k == "distinct_points" else f"{v}" if isinstance(v, int) else f"{v:.0%}"
                         for k, v in result.items()) + " |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
