"""Loss curves of a pipeline run, one panel per stage, as a PNG:

    python -m bench.training_curves runs/pipeline/demo --out docs/bench/training-loss.png

Reads ``runs/tower/metrics.jsonl`` and each stage's ``runs/<stage>/metrics.jsonl``
(training loss per logged step; the eval set's loss before the first step and after the
last, where the run has one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.pipeline import PRESETS

STAGES = ("tower", *PRESETS["demo"].steps)  # the pipeline's runs, in order


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training_curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a pipeline output directory (holding runs/)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/training-loss.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if (args.run / "runs" / s / "metrics.jsonl").exists()]
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 3.0), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = read(args.run / "runs" / stage / "metrics.jsonl")
        trained = [r for r in rows if "loss" in r]  # an eval before the first step has no training loss
        ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], lw=1, label="train")
        evals = [r for r in rows if r.get("eval_loss") is not None]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", ms=4, label="eval set")
        ax.set_title("tower pretraining" if stage == "tower" else f"stage: {stage}")
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("token loss (nats)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"curves in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
