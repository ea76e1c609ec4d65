"""Recorded rollouts (``envs.trajectory``) as LLaVA-format records for trajectory fine-tuning.

An episode becomes one multi-turn conversation in the agent's own prompt layout
(``agent.prompt.step_pieces``): the task instruction once, in the first user turn, then
per step a user turn holding the screenshot and the screen's text, and the policy's
output as the answer (the action alone where it recorded no output). Each answer ends
with EOS, as the engine's history does when generation stops at EOS, so the sequence is
token for token what the agent's session holds after the same episode. Only the answers
(and their EOS) are labelled. Nothing of a step's
``info`` (``solution`` included) enters the prompt.

    python -m training.trajectories runs/recall-oracle --out data/trajectories.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

from envs.trajectory import Trajectory, read_trajectories


def episode_record(trajectory: Trajectory, instruction: str) -> dict:
    """One episode as a record; image paths are absolute."""
    turns, images = [], []
    for k, step in enumerate(trajectory.steps):
        head = instruction + "\n" if k == 0 and instruction else ""
        text = "\n" + step["instruction"] if step["instruction"] else ""
        answer = step.get("model_output") or step["action"]
        turns += [{"from": "human", "value": f"{head}<image>{text}"}, {"from": "gpt", "value": answer}]
        images.append(str((trajectory.path / step["screenshot"]).resolve()))
    meta = trajectory.meta
    return {"id": f"{meta['env_id']}/{trajectory.path.name}", "image": images, "conversations": turns}


def records(root: str | Path, instruction: str, successful_only: bool = True) -> Iterator[dict]:
    """Every complete episode under ``root`` (the successful ones only, by default)."""
    for trajectory in read_trajectories(root):
        if trajectory.steps and (trajectory.meta.get("success") or not successful_only):
            yield episode_record(trajectory, instruction)


def write_records(roots: list[str | Path], out: str | Path, instruction: str, successful_only: bool = True) -> int:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(out, "w", encoding="utf-8") as f:
        for root in roots:
            for record in records(root, instruction, successful_only):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.trajectories", description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", type=Path, help="directories that envs.rollout --out wrote")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--instruction", help="the agent's task instruction (default: the model policy's)")
    parser.add_argument("--all", action="store_true", help="keep failed episodes too")
    args = parser.parse_args(argv)
    if args.instruction is None:
        from agent.actions import GRAMMAR_HELP  # what agent.policy.ModelPolicy instructs with

        args.instruction = GRAMMAR_HELP
    count = write_records(args.roots, args.out, args.instruction, successful_only=not args.all)
    print(f"{count} episodes -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
