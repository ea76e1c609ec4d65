"""``python -m serving``: one chat turn through the Engine, streamed to the terminal.

With no ``--model`` it runs the embedded default model (a small demo trained on the envs'
screen tasks, byte tokenizer), so it works on a fresh machine with no files; point
``--model`` at a LongLLaVA checkpoint directory for a real model's answers. With ``--checkpoint-dir`` the session is durable: the run
prints its id, and ``--session <id>`` in a later run (any process, any machine sharing the
directory) continues it as the next step, with its whole history.

Mistakes in the arguments (a missing directory, an image that cannot be read, a sampling
value out of range) are reported as usage errors before the model loads. The model's
output is printed with control characters escaped, since it can be any bytes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image as PILImage
from pydantic import ValidationError

from model import ops
from model.prompt import Image, Text, as_rgb, user_message

from .engine import Engine
from .errors import StoreUnavailableError
from .types import SamplingParams


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    for flag, where in (("--model", args.model), ("--vision-tower", args.vision_tower), ("--tokenizer", args.tokenizer)):
        if where is not None and not Path(where).is_dir():
            p.error(f"{flag} {where}: no such directory")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: not a checkpoint directory (it has no config.json)")
    if args.session is not None and args.checkpoint_dir is None:
        p.error("--session needs --checkpoint-dir: the directory the session was checkpointed to")
    sampling = _sampling(p, args)
    images = [Image(_read_image(p, path)) for path in args.image]
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        engine = Engine.from_pretrained(
            args.model, vision_tower_path=args.vision_tower, tokenizer_path=args.tokenizer, kernels=args.kernels,
            checkpoint_dir=args.checkpoint_dir,
        )
    except (OSError, ValueError, StoreUnavailableError) as exc:  # a model, tokenizer or store that cannot be used
        p.error(f"cannot start the engine: {exc}")
    if args.model is None:
        print("[embedded default model: a small demo trained on the envs' screen tasks; "
              "give --model for a real checkpoint]", file=sys.stderr)
    try:
        session = engine.create() if args.session is None else args.session
        step = engine.append(session, user_message([*images, Text(args.prompt)]))
    except (KeyError, ValueError) as exc:  # an unknown or damaged session; more tokens than one append takes
        p.error(f"cannot append the prompt: {exc}")
    print(f"[appended {step.tokens} tokens: {len(images)} image(s) and the question]", file=sys.stderr)

    for event in engine.generate(session, sampling):
        print(printable(event.text), end="", flush=True)
    engine.shutdown()  # every change is on disk before the process ends
    info = engine.session_info(session)
    where = f"; session {session}, step {info.step}, durable in {args.checkpoint_dir}" if args.checkpoint_dir else ""
    print(f"\n[{info.length} tokens in history; session state {info.state_bytes / 2**20:.2f} MiB{where}]", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="LongLLaVA checkpoint directory (default: the embedded model)")
    p.add_argument("--vision-tower", help="local CLIP directory, if the config's mm_vision_tower is elsewhere")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    p.add_argument("--prompt", default="What is on the screen?")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--kernels", choices=ops.CHOICES, help="Mamba kernels (default: auto, Triton on CUDA)")
    p.add_argument("--checkpoint-dir", help="make the session durable in this directory (local or shared)")
    p.add_argument("--session", help="continue this session from --checkpoint-dir instead of starting one")
    return p


def _sampling(p: argparse.ArgumentParser, args: argparse.Namespace) -> SamplingParams:
    """The sampling flags, checked by ``SamplingParams`` itself so the bounds live in one place."""
    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    except ValidationError as exc:
        error = exc.errors()[0]
        p.error(f"--{str(error['loc'][0]).replace('_', '-')} {error['input']}: {error['msg']}")


def _read_image(p: argparse.ArgumentParser, path: str) -> PILImage.Image:
    """The file's pixels, decoded now: a bad image is a usage error, not a failure mid-run."""
    try:
        image = PILImage.open(path)
    except (OSError, PILImage.DecompressionBombError) as exc:  # missing, unreadable, not an image, huge
        p.error(f"--image {path}: {getattr(exc, 'strerror', None) or exc}")
    try:
        return as_rgb(image, f"--image {path}")
    except ValueError as exc:  # corrupt, or of a mode or size that is refused
        p.error(str(exc))


def printable(text: str) -> str:
    """``text`` safe to write to a terminal: every character that is not printable (escape
    sequences, carriage returns, NUL, bidirectional overrides...) as a Python-style escape
    such as ``\\x1b``, so model output cannot move the cursor or restyle the terminal.
    Newlines and tabs stay as they are."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode("ascii") for c in text)


if __name__ == "__main__":
    main()
