"""Success rates of a model against the random and oracle baselines, on held-out seeds:

    python -m training.evaluate [--model DIR] [--episodes 20] [--write-manifest]

Every episode goes through ``envs.rollout`` with ``--agent model`` (the Agent on a local
Engine), from seed ``EVAL_SEED`` on, which no training data used. Without ``--model`` it
evaluates the embedded default model; ``--write-manifest`` stores the table in the
model directory's ``manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from envs.rollout import run_rollout
from model.default import WEIGHTS_DIR

from .pipeline import EVAL_SEED

# (task, env arguments, episodes as a share of --episodes): the targets first
SUITE = (
    ("RecallCode", {"difficulty": "easy", "memory_span": 50}, 1.0),
    ("ClickTarget", {"difficulty": "easy"}, 1.0),
    ("RecallCode", {"difficulty": "easy", "memory_span": 100}, 0.25),
    ("RecallCode", {"difficulty": "easy", "memory_span": 200}, 0.25),
    ("RecallCode", {"difficulty": "easy", "memory_span": 500}, 0.15),
    ("CountEvents", {"difficulty": "easy"}, 0.5),
    ("OrderEvents", {"difficulty": "easy"}, 0.5),
    ("NeedleFrame", {"difficulty": "easy"}, 0.5),
)


def evaluate(model: Path | None, episodes: int, progress: bool = True) -> list[dict]:
    rows = []
    for task, env_kwargs, share in SUITE:
        n = max(2, round(episodes * share))
        env_id = f"longllava/{task}-v0"
        row = {"task": task, **env_kwargs, "episodes": n, "seed": EVAL_SEED}
        for policy in ("random", "oracle", "model"):
            agent_args = {"model": str(model)} if policy == "model" and model is not None else {}
            result = run_rollout(env_id, policy, episodes=n, seed=EVAL_SEED, env_kwargs=env_kwargs,
                                 agent_args=agent_args, progress=progress and policy == "model")
            row[policy] = result.success_rate
        rows.append(row)
        if progress:
            print(json.dumps(row), file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| task | difficulty | memory span | episodes | random | oracle | model |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        span = r.get("memory_span", "default")
        lines.append(f"| {r['task']} | {r['difficulty']} | {span} | {r['episodes']} | "
                     f"{r['random']:.0%} | {r['oracle']:.0%} | **{r['model']:.0%}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a checkpoint directory (default: the embedded model)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--write-manifest", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = evaluate(args.model, args.episodes)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    if args.write_manifest:
        path = (args.model or WEIGHTS_DIR) / "manifest.json"
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["evaluation"] = {"command": "python -m training.evaluate " + " ".join(argv or sys.argv[1:]), "rows": rows}
        path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
