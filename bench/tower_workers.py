"""The tower's pretraining on N cores: N threads in one process against N Ray Train
workers of one thread each (``training.distributed.build_tower_on_ray``), side by side.

    python -m bench.tower_workers [--workers 2] [--steps 60] [--screens 400]

Both runs train the demo config's tower from the same seed on the same freshly rendered
toolbars, batch 32, and so make the same updates; the time is the whole ``build_tower``
call (for the workers, Ray Train's start included) over ``--steps``. Ray starts before
the first run, so its start is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from model.default import DEFAULT_CONFIG
from training import synthetic
from training.distributed import build_tower_on_ray
from training.tower import build_tower


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tower_workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--screens", type=int, default=400)
    args = parser.parse_args(argv)
    import ray

    ray.init(include_dashboard=False, configure_logging=False, num_cpus=args.workers)
    root = Path(tempfile.mkdtemp(prefix="tower-workers-"))
    side = math.isqrt(DEFAULT_CONFIG.image_tokens)
    records = synthetic.screens(synthetic.Writer(root / "data"), args.screens, seed=1, weights={"ClickTarget": 1.0},
                                side=side, name="toolbars")
    job = dict(architecture=DEFAULT_CONFIG.to_dict(), phases=[(str(records), args.steps)], lr=3e-3, seed=0)
    torch.set_num_threads(args.workers)
    tick = time.perf_counter()
    build_tower(**job, run=str(root / "threads"))
    threads = time.perf_counter() - tick
    tick = time.perf_counter()
    build_tower_on_ray(**job, run=root / "workers", num_workers=args.workers)
    workers = time.perf_counter() - tick
    result = {"workers": args.workers, "steps": args.steps, "threads_s_per_step": round(threads / args.steps, 3),
              "ray_workers_s_per_step": round(workers / args.steps, 3), "speedup": round(threads / workers, 2)}
    print(f"| {args.workers} threads, one process | {result['threads_s_per_step']} s/step |\n"
          f"| {args.workers} Ray Train workers | {result['ray_workers_s_per_step']} s/step |\n"
          f"workers {result['speedup']}x threads")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
