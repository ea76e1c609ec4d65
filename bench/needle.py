"""The needle test of the LongLLaVA paper's Figure 7, on NeedleFrame: retrieval accuracy
against the number of frames and the needle's depth, as a heat map.

    python -m bench.needle [--model DIR] [--frames 8 32 128 512 1000] [--depths 5] [--trials 4]
        [--out docs/bench/needle]

Each trial is a held-out NeedleFrame episode (easy) of N frames: a video of N - 1 frames
plus the needle (the caption frame), moved to each depth in turn. As in V-NIAH, the
frames go in as one video (``<vid>``, frames joined by ``<t>``, 36 tokens each), then the
quiz screen and its question with four options; the model's first action must name the
right letter. The video is appended frame by frame onto one Engine session and forked
at each depth, so the frames before the needle are read once per trial. The JSON beside
the heat map keeps every answer with the right one, to tell a guess from a fixed reply.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from agent.actions import parse_action
from envs.render import render
from model.prompt import ASSISTANT_PREFIX, FRAME_SEPARATOR, USER_PREFIX, VIDEO_END, VIDEO_START, Image, Text
from serving.engine import Engine
from serving.sampling import SamplingParams
from training.pipeline import EVAL_SEED
from training.synthetic import SIZE, episode


def haystack(frames: int, trial: int):
    """A NeedleFrame episode's video frames without the needle, the needle, the quiz, the answer."""
    ep = episode("NeedleFrame", EVAL_SEED + 10_000 * frames + trial, difficulty="easy", memory_span=frames)
    *watched, quiz = ep.screens
    needle = next(k for k, s in enumerate(watched) if any(getattr(e, "label", "").startswith("The secret") for e in s.elements))
    others = watched[:needle] + watched[needle + 1 :]
    return [render(s, SIZE, SIZE) for s in others], render(watched[needle], SIZE, SIZE), quiz, ep.solution.text


def frame_pieces(frame: np.ndarray, first: bool) -> list:
    return [Text(USER_PREFIX + VIDEO_START) if first else Text(FRAME_SEPARATOR), Image(frame)]


def answer(engine: Engine, session: str, quiz, quiz_frame: np.ndarray) -> str:
    engine.append(session, [Text(VIDEO_END + "\n"), Image(quiz_frame), Text("\n" + quiz.instruction + "\n" + ASSISTANT_PREFIX)])
    text, _ = engine.generate_text(session, SamplingParams(max_new_tokens=16))
    parsed = parse_action(text)
    return parsed.action.text if parsed.ok and parsed.action.kind == "answer" else ""


def trial(engine: Engine, frames: int, depths: list[float], k: int) -> tuple[list[str], str]:
    """One haystack: the model's answer with the needle at each depth (a share of the
    video), in order, and the right one."""
    others, needle, quiz, right = haystack(frames, k)
    quiz_frame = render(quiz, SIZE, SIZE)
    positions = [round(d * (frames - 1)) for d in depths]
    session, read = engine.create(), 0
    answers = []
    for position in positions:
        while read < position:  # the shared prefix, once
            engine.append(session, frame_pieces(others[read], read == 0))
            read += 1
        branch = engine.fork(session)
        engine.append(branch, frame_pieces(needle, position == 0))
        for j in range(position, len(others)):
            engine.append(branch, frame_pieces(others[j], False))
        answers.append(answer(engine, branch, quiz, quiz_frame))
        engine.close(branch)
    engine.close(session)
    return answers, right


def heat_map(grid: np.ndarray, frames: list[int], depths: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(frames) + 2, 0.6 * len(depths) + 1.6))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(frames)), [str(f) for f in frames])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("frames in the video (36 tokens each)")
    ax.set_ylabel("needle depth")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title("NeedleFrame retrieval accuracy (chance 25%)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.needle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a checkpoint directory (default: the embedded model)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 128, 512, 1000])
    parser.add_argument("--depths", type=int, default=5, help="needle depths, evenly from first to last frame")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/needle"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    engine = Engine.from_pretrained(args.model, device="cpu", max_chunk_tokens=1 << 20)
    depths = list(np.linspace(0, 1, args.depths))
    grid = np.zeros((len(depths), len(args.frames)))
    answers = {}  # frames -> per trial: the right letter, then the answer at each depth
    for j, n in enumerate(args.frames):
        trials = [trial(engine, n, depths, k) for k in range(args.trials)]
        answers[n] = [[right, *given] for given, right in trials]
        grid[:, j] = np.array([[a == right for a in given] for given, right in trials], dtype=float).mean(0)
        print(f"{n} frames: " + " ".join(f"{d:.0%}:{a:.0%}" for d, a in zip(depths, grid[:, j])), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    heat_map(grid, args.frames, depths, args.out.with_suffix(".png"))
    result = {"frames": args.frames, "depths": depths, "trials": args.trials, "accuracy": grid.tolist(), "answers": answers,
              "command": "python -m bench.needle " + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"heat map in {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
