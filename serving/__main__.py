"""``python -m serving``: one chat turn through the Engine, streamed to the terminal.

With no ``--model`` it runs the embedded default model (random weights, byte tokenizer), so
it works on a fresh machine with no files; point ``--model`` at a LongLLaVA checkpoint
directory for real answers.
"""

from __future__ import annotations

import argparse
import logging
import sys

from PIL import Image as PILImage

from model import ops
from model.prompt import Image, Text, user_message

from .engine import Engine
from .sampling import SamplingParams


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    p.add_argument("--model", help="LongLLaVA checkpoint directory (default: the embedded model)")
    p.add_argument("--vision-tower", help="local CLIP directory, if the config's mm_vision_tower is elsewhere")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    p.add_argument("--prompt", default="What is on the screen?")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--kernels", choices=ops.CHOICES, help="Mamba kernels (default: auto, Triton on CUDA)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    engine = Engine.from_pretrained(
        args.model, vision_tower_path=args.vision_tower, tokenizer_path=args.tokenizer, kernels=args.kernels
    )
    if args.model is None:
        print("[embedded default model: random weights, so the answer is noise until a checkpoint is given]", file=sys.stderr)
    session = engine.create()
    images = [Image(PILImage.open(path)) for path in args.image]
    step = engine.append(session, user_message([*images, Text(args.prompt)]))
    print(f"[appended {step.tokens} tokens: {len(images)} image(s) and the question]", file=sys.stderr)

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    for event in engine.generate(session, sampling):
        print(event.text, end="", flush=True)
    info = engine.session_info(session)
    state = engine.state_of(session)
    print(f"\n[{info.length} tokens in history; session state {state.nbytes / 2**20:.2f} MiB]", file=sys.stderr)


if __name__ == "__main__":
    main()
