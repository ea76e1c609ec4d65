"""One entry point for every stage:

    python -m training <text|align|single|multi|trajectory> [--config run.json]
        [--data FILE ...] [--eval-data FILE ...] [--output-dir DIR] [--init CHECKPOINT]
        [--lr 2e-5] [--schedule cosine] [--batch-size 4] [--grad-accum 1] [--max-length 4096]
        [--epochs 1 | --max-steps N] [--gradient-checkpointing] [--no-bf16]
        [--num-workers N] [--set KEY=VALUE ...]

Flags override the config file; ``--set`` reaches any other ``TrainConfig`` field (JSON
values). With ``--num-workers`` above 1 the run goes through Ray Train. It resumes from
the newest checkpoint in its output directory, if there is one, and writes the final
model to ``<output-dir>/model`` in the LongLLaVA layout, with ``metrics.jsonl`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import get_args

from .config import TrainConfig
from .stages import StageName

FLAGS = {  # flag -> TrainConfig field
    "output_dir": str, "init": str, "vision_tower": str, "tokenizer": str, "lr": float, "schedule": str,
    "batch_size": int, "grad_accum": int, "max_length": int, "epochs": float, "max_steps": int,
    "eval_every": int, "save_every": int, "seed": int, "num_workers": int, "device": str,
}


def parse_config(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=get_args(StageName))
    parser.add_argument("--config", help="a JSON file of TrainConfig fields")
    parser.add_argument("--data", action="append", help="a LLaVA-format JSON/JSONL file (repeatable)")
    parser.add_argument("--eval-data", action="append")
    for name, kind in FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind)
    parser.add_argument("--trains", help="comma-separated parts that train, e.g. vision,projector,llm")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--eval-on-start", action="store_true", default=None, help="the eval loss before step 1 too")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    fields: dict = json.loads(open(args.config, encoding="utf-8").read()) if args.config else {}
    fields["stage"] = args.stage
    for name in [*FLAGS, "gradient_checkpointing", "eval_on_start", "bf16"]:
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.data:
        fields["data"] = [{"path": p} for p in args.data]
    if args.eval_data:
        fields["eval_data"] = [{"path": p} for p in args.eval_data]
    if args.trains:
        fields["trains"] = args.trains.split(",")
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    try:
        return TrainConfig.model_validate(fields)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(sys.argv[1:] if argv is None else argv)
    from .distributed import fit

    print(f"model written to {fit(config)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
