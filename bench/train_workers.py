"""Training on every core: one process with one thread, one with N threads, and N Ray Train
workers of one thread each, on the same stage, data and start, side by side:

    python -m bench.train_workers --init RUN/runs/align/model --data RUN/data/screens/questions.jsonl

(``RUN`` is a ``training.pipeline`` output directory.) Each variant runs ``--steps``
optimizer steps of ``--batch`` samples (split over the workers, so every variant makes the
same updates) through ``training.distributed.fit``, the pipeline's own path, and reports
the Trainer's tokens per second (from its first step to its last, so Ray's start-up is
not counted) and the last loss, which should agree to float tolerance.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from training.config import DataSource, TrainConfig
from training.distributed import fit


def run(args: argparse.Namespace, threads: int, workers: int, out: Path) -> dict:
    torch.set_num_threads(threads)
    config = TrainConfig(
        stage=args.stage, data=[DataSource(path=str(args.data))], init=str(args.init), output_dir=str(out),
        lr=2e-3, batch_size=args.batch // workers, num_workers=workers, max_steps=args.steps, seed=0, progress=False,
    )
    began = time.perf_counter()
    fit(config)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"threads": threads, "workers": workers, "tokens_per_s": last["tokens_per_s"], "loss": last["loss"],
            "wall_s": time.perf_counter() - began}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, required=True, help="the checkpoint the stage starts from")
    parser.add_argument("--data", type=Path, required=True, help="the stage's LLaVA-format JSONL")
    parser.add_argument("--stage", default="single")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="samples per optimizer step, over all workers")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="a JSON file for the rows")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for k, (threads, workers) in enumerate([(1, 1), (args.workers, 1), (1, args.workers)]):
            rows.append(run(args, threads, workers, Path(root) / str(k)))
    base = rows[0]["tokens_per_s"]
    print("| processes x threads | tokens/s | x one thread | last loss | wall s (with start-up) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} x {r['threads']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x "
              f"| {r['loss']:.6f} | {r['wall_s']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
