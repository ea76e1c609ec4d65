"""The embedded demo model, end to end on a CPU:

    python -m training.pipeline --preset demo --workers 2 --install   # 54 min on 2 cores (docs/benchmarks.md)
    python -m training.pipeline --preset smoke                        # < 3 min: checks that the loss falls

1. data: LLaVA-format JSONL rendered from the envs (``training.synthetic``), and oracle
   rollouts recorded by ``envs.rollout`` and converted by ``training.trajectories``;
2. the vision tower, pretrained to read what each pooled cell of a screen shows
   (``training.tower``), on toolbars alone first, then on every screen kind: it stands
   in for CLIP, which no package ships;
3. stage 1 (align, captions), stage 2 (single-screen questions), stage 3 (multi-screen
   and video questions, tiled screens, replay of stage 2 and text data) and trajectory
   fine-tuning, each a ``Trainer`` run starting from the one before, with LongLLaVA's
   recipes (the pretrained tower frozen throughout) but these changes: the LLM starts
   random, so it trains in stage 1 along with the projector; stage 2 runs twice, first
   (``read``) on the access-code question alone, then (``click``) on toolbars asking
   for a named button, and the other question kinds come in stage 3's replay (a third
   stage-2 run on every kind changed neither the click nor the recall). A random LLM
   learns to copy text out of image tokens only after a long plateau, which it leaves
   on one question kind in a few hundred steps and within a mix of kinds not in the
   hour; stage 3 runs at a quarter of the rate, and the access-code questions are
   replayed in it and in trajectory fine-tuning, which keeps more of that; stage 3 runs
   twice, then (``recall``) on access-code questions asked several screens after the
   code: copying from the screen just before a question does not carry over to an
   earlier screen, which has its own plateau; the ``click`` run's toolbars are replayed
   in ``recall`` and trajectory fine-tuning, which otherwise lose the click (a
   ``recall`` run without them clicked no toolbar); trajectory fine-tuning
   leaves the projector as stage 3 left it, and reads each episode a second time with
   only its last action labelled, since its many ``wait()`` replies otherwise teach it to
   wait at the question too;
4. the weights halfway between the ``recall`` run's and trajectory fine-tuning's
   (``interpolate``, WiSE-FT): the episodes teach the action format and blur the letters
   read; the midpoint keeps more of both (docs/benchmarks.md);
5. the result in half precision, with a manifest of how it was made; ``--install``
   writes it into ``model/weights/default``, where ``default_model()`` finds it.

An interrupted run resumes with the same command: finished data and tower are kept, and
each stage resumes from its newest checkpoint (a finished stage from its last). With
``--workers N`` each stage after the tower runs data-parallel on N Ray Train workers
(``training.distributed``), each taking 1/N of every step's samples, so the updates are
those of one worker; the tower trains with N threads, and the data is rendered on N
processes (the same files as on one). Checkpoints are then Ray Train's,
in each stage's ``ray`` directory, and such a run resumes the same way: after a worker
fails, and with the same command (Ray Train restores each stage's run from there).

Training seeds and evaluation seeds never meet: data comes from seeds below
``EVAL_SEED``, and ``training.evaluate`` plays episodes from ``EVAL_SEED`` on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import LongLLaVAConfig
from model.default import DEFAULT_CONFIG, WEIGHTS_DIR
from model.longllava import LongLLaVA

from . import synthetic
from .config import DataSource, TrainConfig
from .data import read_records
from .distributed import fit
from .synthetic import EVAL_SEED, data_seed
from .tower import pretrain_tower
from .trajectories import write_records

log = logging.getLogger(__name__)

PERCEPTION = {"RecallCode": 1.0, "ClickTarget": 1.0, "CountEvents": 0.3, "OrderEvents": 0.3, "NeedleFrame": 0.3}
READING = {"RecallCode": 1.0, "ClickTarget": 1.0, "CountEvents": 0.15, "OrderEvents": 0.15, "NeedleFrame": 0.15}
CLICK_ALONE_SHARE = 0.2  # of the ``click`` run's toolbars, those that show the named button alone
SEQUENCE = {"RecallCode": 1.0, "ClickTarget": 0.5, "OrderEvents": 0.3, "CountEvents": 0.3, "NeedleFrame": 0.3}
# screens between the code and its question in the ``recall`` run: a run on gaps up to 16
# recalled from 16 screens back and not from 50 (docs/benchmarks.md), so they reach past 50
RECALL_SPANS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# runs that take each sample alone (gradient accumulation; the same update, as a step's loss
# is a sum over its labelled tokens): a micro-batch pads to its longest sample, and with the
# recall run's gaps of 1 to 64 screens padded batches took it 2.7x as long (docs/benchmarks.md)
ONE_AT_A_TIME = frozenset({"recall"})
# each run's eval set: the first records of its main data, scored before and after it; the run
# trains on them too, so they tell whether its loss fell, not how well it generalises
EVAL_SAMPLES = 16


@dataclass(frozen=True)
class Episodes:
    """Oracle rollouts of one task for trajectory fine-tuning."""

    task: str
    episodes: int
    spans: tuple[int, ...]
    difficulty: str = "easy"


@dataclass(frozen=True)
class Preset:
    architecture: dict
    screens: int
    captions: int
    codes: int  # access-code questions for the ``read`` run
    questions: int  # single-screen questions of every kind, replayed in stage 3
    sequences: int
    recalls: int  # access-code questions several screens after the code, for the ``recall`` run
    clicks: int  # toolbars asking for a named button, for the ``click`` run
    texts: int
    trajectories: tuple[Episodes, ...]
    toolbars: int  # toolbar screens, which the tower learns to read first
    tower_toolbar_steps: int  # tower steps on those toolbars alone, before ``tower_steps`` on ``screens``
    tower_steps: int
    tower_lr: float
    steps: dict[str, int]  # run -> optimizer steps
    batch: dict[str, int]  # run -> samples per step
    lr: float = 1e-3
    max_length: int = 8192
    trajectory_weight: float = 1.0  # share of trajectory fine-tuning's change that ships (``interpolate``)


TINY_ARCH = DEFAULT_CONFIG.model_copy(update=dict(
    hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1, mm_hidden_size=32,
    vision_config=DEFAULT_CONFIG.vision_config.model_copy(update=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32)),
)).to_dict()

PRESETS = {
    "smoke": Preset(
        architecture=TINY_ARCH, screens=64, captions=48, codes=32, questions=10, sequences=24, recalls=16,
        clicks=16, texts=16, trajectories=(Episodes("RecallCode", 6, (2,)), Episodes("ClickTarget", 6, (0,))),
        toolbars=16, tower_toolbar_steps=10, tower_steps=20, tower_lr=3e-3,
        steps={"align": 12, "read": 8, "click": 8, "multi": 20, "recall": 8, "trajectory": 20},
        batch={"align": 8, "read": 8, "click": 8, "multi": 4, "recall": 4, "trajectory": 4}, lr=3e-3,
        trajectory_weight=0.5,
    ),
    "demo": Preset(
        architecture=DEFAULT_CONFIG.to_dict(), screens=6000, captions=800, codes=6000, questions=1600, sequences=600,
        recalls=2000, clicks=10000, texts=300,
        trajectories=(
            Episodes("RecallCode", 500, (1, 2, 4, 8, 16)), Episodes("ClickTarget", 400, (0,)),
            Episodes("OrderEvents", 48, (4,)), Episodes("CountEvents", 48, (4,)), Episodes("NeedleFrame", 48, (6,)),
        ),
        toolbars=6000, tower_toolbar_steps=1700, tower_steps=1200, tower_lr=3e-3,
        steps={"align": 40, "read": 700, "click": 2000, "multi": 60, "recall": 150, "trajectory": 350},
        batch={"align": 16, "read": 16, "click": 16, "multi": 8, "recall": 8, "trajectory": 2}, lr=2e-3,
        trajectory_weight=0.5,
    ),
}


# ----------------------------------------------------------------------------- data
def make_data(preset: Preset, root: Path, seed: int, workers: int = 1) -> dict[str, Path]:
    """Every stage's JSONL under ``root``, generated on ``workers`` processes; seeds stay
    below ``EVAL_SEED``. Data that an interrupted run finished (``files.json`` is written
    last) is kept."""
    done = root / "files.json"
    if done.exists():
        return {name: root / path for name, path in json.loads(done.read_text(encoding="utf-8")).items()}
    side = math.isqrt(LongLLaVAConfig.model_validate(preset.architecture).image_tokens)  # the pooled token grid
    jobs = {  # name -> (generator, its arguments after the writer), the most images first (balances the pool)
        "recalls": (synthetic.sequences, (preset.recalls, seed + 7, {"RecallCode": 1.0}, 0.0, "recalls", RECALL_SPANS)),
        "clicks": (synthetic.clicks, (preset.clicks, seed + 8, CLICK_ALONE_SHARE)),
        "questions": (synthetic.questions, (preset.questions, seed + 3, READING)),
        "screens": (synthetic.screens, (preset.screens, seed + 1, READING, side)),
        "toolbars": (synthetic.screens, (preset.toolbars, seed + 9, {"ClickTarget": 1.0}, side, "toolbars")),
        "codes": (synthetic.questions, (preset.codes, seed + 6, {"RecallCode": 1.0}, "codes")),
        "sequences": (synthetic.sequences, (preset.sequences, seed + 4, SEQUENCE)),
        "captions": (synthetic.captions, (preset.captions, seed + 2, PERCEPTION)),
        "texts": (synthetic.texts, (preset.texts, seed + 5)),
    }
    if workers == 1:
        files = {name: _generate(root / "screens", name, *job) for name, job in jobs.items()}
        files["trajectories"] = trajectories(preset.trajectories, root, seed)
    else:  # spawned, not forked: this process may already hold torch's thread pools
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {"trajectories": pool.submit(trajectories, preset.trajectories, root, seed)}
            futures.update({name: pool.submit(_generate, root / "screens", name, *job) for name, job in jobs.items()})
            files = {name: future.result() for name, future in futures.items()}
    done.write_text(json.dumps({name: str(path.relative_to(root)) for name, path in files.items()}), encoding="utf-8")
    return files


def _generate(images: Path, name: str, generator: Callable[..., Path], args: tuple) -> Path:
    """One ``training.synthetic`` generator, writing its images as ``<name>-NNNNNNN.png``."""
    return generator(synthetic.Writer(images, prefix=f"{name}-"), *args)


def trajectories(jobs: tuple[Episodes, ...], root: Path, seed: int) -> Path:
    """Oracle rollouts of every job under ``root/rollouts``, as ``root/trajectories.jsonl``."""
    from agent.actions import GRAMMAR_HELP  # the instruction agent.policy.ModelPolicy gives
    from envs.rollout import run_rollout

    roots = []
    for k, job in enumerate(jobs):
        for j, span in enumerate(job.spans):
            out = root / "rollouts" / f"{job.task}-{span}"
            run_rollout(f"longllava/{job.task}-v0", "oracle", episodes=max(1, job.episodes // len(job.spans)),
                        seed=data_seed(seed + 10 + k, j * 1_000), out=out,
                        env_kwargs={"memory_span": span, "difficulty": job.difficulty})
            roots.append(out)
    write_records(roots, root / "trajectories.jsonl", GRAMMAR_HELP)
    return root / "trajectories.jsonl"


def data_hash(files: dict[str, Path]) -> str:
    """SHA-256 over every JSONL file and the images they name, in a fixed order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(files[name].read_bytes())
    for image in sorted((files["screens"].parent / "images").glob("*.png")):
        digest.update(image.read_bytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- stages
def tower(preset: Preset, files: dict[str, Path], run: Path, seed: int) -> tuple[float, float]:
    """The seeded model with its tower pretrained, in ``run/model`` (kept when an
    interrupted run finished it); returns its ``loss_ends``.
    The tower reads toolbars first, alone: beside the other screens a tower never learnt
    the white labels on coloured buttons, and a tower that had learnt them on toolbars
    kept them through the mix; 1,700 and 1,200 steps read labels whole in 88% of a
    toolbar's cells and codes whole in 74%, where 1,400 and 1,000 read 77% and 65%
    (docs/benchmarks.md)."""
    if not (run / "model" / "config.json").exists():
        architecture = LongLLaVAConfig.model_validate(preset.architecture)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LongLLaVA(architecture)
        run.mkdir(parents=True, exist_ok=True)
        logged = 0
        for screens, steps in ((files["toolbars"], preset.tower_toolbar_steps), (files["screens"], preset.tower_steps)):
            pretrain_tower(model, screens, steps, lr=preset.tower_lr, seed=seed, log=run / "metrics.jsonl",
                           logged=logged)
            logged += steps
        save_checkpoint(model, run / "model")
    return loss_ends(run / "metrics.jsonl")


def loss_ends(metrics: Path) -> tuple[float, float]:
    """Where a run's loss started and ended: its loss on a fixed eval set before the first
    step and after the last, where it has one; else (the tower) the mean of its first five
    logged losses and of its last five (fewer in a short run). The training loss judged a
    trajectory run badly: its first steps at the warm-up rate already fitted the episodes
    they drew, and the full rate then lifted the loss (docs/benchmarks.md)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    start = next((row["eval_loss"] for row in rows if row["step"] == 0 and "eval_loss" in row), None)
    later = [row["eval_loss"] for row in rows if row["step"] > 0 and "eval_loss" in row]
    if start is not None and later:
        return start, later[-1]
    curve = [row["loss"] for row in rows if "loss" in row]
    if not curve:
        raise ValueError(f"{metrics} logs no loss")
    k = max(1, min(5, len(curve) // 2))
    return sum(curve[:k]) / k, sum(curve[-k:]) / k


def stage_configs(preset: Preset, files: dict[str, Path], runs: Path, seed: int, workers: int = 1) -> list[TrainConfig]:
    def source(name: str, fraction: float = 1.0, mask_history: bool = False) -> DataSource:
        return DataSource(path=str(files[name]), fraction=fraction, mask_history=mask_history)

    def first(data: DataSource) -> DataSource:  # the fixed set that tells whether the run's loss fell
        records, _ = read_records(data.path, data.image_folder)
        if not records:
            raise ValueError(f"{data.path} holds no usable records")
        return data.model_copy(update={"fraction": min(1.0, EVAL_SAMPLES / len(records))})

    plan = [  # (run, stage, data, settings where the recipe is not LongLLaVA's)
        ("align", "align", [source("captions")], {"trains": ("projector", "llm")}),  # the LLM starts random
        # one question kind first (see the docstring), decaying: at a constant rate its loss
        # left the plateau by step 550 and jumped back at 570 for good (docs/benchmarks.md)
        ("read", "single", [source("codes")], {}),
        # then one more: toolbars, a share with the named button alone (see ``clicks``), the
        # codes replayed at 0.6, for 2,000 steps: with 0.3 and 1,300 steps the run ended
        # reading 50% of codes whole; with 0.6 and 1,300 steps the clicks lagged (42% hit);
        # with 0.6 and 2,000 steps it reads 70% and hits 87% (docs/benchmarks.md)
        ("click", "single", [source("clicks"), source("codes", 0.6)], {}),
        # stage 3 at a quarter of the rate: at the full rate its new formats erased most of
        # the copying that stage 2 had learnt (docs/benchmarks.md)
        ("multi", "multi", [source("sequences"), source("questions"), source("codes", 0.1), source("texts")],
         {"lr": preset.lr / 4}),
        # a code several screens after it was shown: copying from the screen just before the
        # question does not carry over to that, which leaves its own plateau here; the clicks
        # replayed, since without them this run forgot the click that ``click`` had taught;
        # decaying, it ended with half the loss of a constant rate and clicked better after
        ("recall", "multi", [source("recalls"), source("codes", 0.1), source("clicks", 0.05)], {"lr": preset.lr / 2}),
        # codes and clicks replayed here too (trajectory fine-tuning alone lost the reading); at half
        # this rate it never learnt when to type; with the projector frozen it keeps more
        # of the reading (docs/benchmarks.md); each episode a second time with only its last
        # action labelled, since its many wait() replies taught it to wait at the form too
        ("trajectory", "trajectory", [source("trajectories"), source("trajectories", mask_history=True),
                                      source("codes", 0.05), source("clicks", 0.02)], {"trains": ("llm",)}),
    ]
    configs, previous = [], runs / "tower" / "model"
    for name, stage, data, settings in plan:
        configs.append(TrainConfig(
            stage=stage, data=data, eval_data=[first(data[0])], eval_on_start=True,
            output_dir=str(runs / name), init=str(previous),
            **_micro_batches(name, preset.batch[name], workers), num_workers=workers, max_steps=preset.steps[name],
            warmup_ratio=0.05, max_length=preset.max_length, seed=seed, progress=True, log_every=5,
            **{"lr": preset.lr, **settings},
        ))
        previous = runs / name / "model"
    return configs


def _micro_batches(run: str, batch: int, workers: int) -> dict[str, int]:
    """Each worker's share of a step's ``batch`` samples: in one micro-batch, or in
    ``ONE_AT_A_TIME`` runs one sample per micro-batch."""
    if batch % workers:
        raise ValueError(f"a step's {batch} samples do not divide over {workers} workers")
    share = batch // workers
    return {"batch_size": 1, "grad_accum": share} if run in ONE_AT_A_TIME else {"batch_size": share, "grad_accum": 1}


def run(preset_name: str, out: Path, seed: int = 0, install: bool = False, workers: int = 1) -> dict:
    preset = PRESETS[preset_name]
    commit = _commit()  # the tree the run starts from, not the one it ends in
    torch.set_num_threads(workers)  # the tower trains here, on as many cores as the workers would take
    began = time.perf_counter()
    runs = out / "runs"
    steps = ["data", "tower", *preset.steps, "write"]
    bar = tqdm(steps, desc="pipeline", unit="stage", position=0, dynamic_ncols=True)
    timings, losses = {}, {}

    def done(name: str, tick: float) -> None:
        timings[name] = round(time.perf_counter() - tick, 1)
        bar.update()

    tick = time.perf_counter()
    files = make_data(preset, out / "data", seed, workers)
    done("data", tick)

    tick = time.perf_counter()
    losses["tower"] = tower(preset, files, runs / "tower", seed)
    done("tower", tick)

    configs = stage_configs(preset, files, runs, seed, workers)
    for config in configs:
        tick = time.perf_counter()
        fit(config)
        output = Path(config.output_dir)
        losses[output.name] = loss_ends(output / "metrics.jsonl")
        done(output.name, tick)

    tick = time.perf_counter()
    last = Path(configs[-1].output_dir) / "model"
    final = interpolate(Path(configs[-1].init), last, preset.trajectory_weight)
    manifest = {
        "command": "python -m training.pipeline " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("pipeline.py")
        else f"python -m training.pipeline --preset {preset_name}",
        "preset": preset_name,
        "seed": seed,
        "data_sha256": data_hash(files),
        "commit": commit,
        "torch": torch.__version__,
        "stages": {name: {"seconds": timings.get(name), "first_loss": a, "last_loss": b} for name, (a, b) in losses.items()},
        "recipe": asdict(preset),
        "evaluation": None,  # filled in by python -m training.evaluate --write-manifest
    }
    packed = out / "model"
    write_half(final, packed)
    done("write", tick)
    manifest["build_seconds"] = round(time.perf_counter() - began, 1)
    (packed / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    bar.close()
    if install:
        if WEIGHTS_DIR.exists():
            shutil.rmtree(WEIGHTS_DIR)
        shutil.copytree(packed, WEIGHTS_DIR)
    return manifest


def interpolate(base: Path, tuned: Path, weight: float) -> LongLLaVA:
    """The checkpoint ``base + weight * (tuned - base)``, tensor by tensor: WiSE-FT
    (Wortsman et al., 2022). Trajectory fine-tuning teaches the episode format and erodes
    the exact reading that the runs before taught; the weights between keep more of both
    than either end (docs/benchmarks.md)."""
    model = load_checkpoint(tuned)
    if weight == 1.0:
        return model
    start = load_checkpoint(base).state_dict()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.lerp(start[name], value, weight))
    return model


def write_half(model: LongLLaVA, target: Path) -> None:
    """``model`` in float16, in the LongLLaVA layout."""
    if target.exists():
        shutil.rmtree(target)
    save_checkpoint(model.half(), target)


def _commit() -> str | None:
    """HEAD, marked ``+dirty`` where tracked files differ from it (the run trains the tree, not HEAD)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--out", type=Path, default=Path("runs/pipeline"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--install", action="store_true", help="write the model into model/weights/default")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers for the stages after the tower")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    manifest = run(args.preset, args.out / args.preset, args.seed, args.install, args.workers)
    for stage, values in manifest["stages"].items():
        print(f"{stage:>10}: loss {values['first_loss']:.3f} -> {values['last_loss']:.3f} in {values['seconds']} s")
    print(f"built in {manifest['build_seconds']} s -> {args.out / args.preset / 'model'}")
    falling = all(v["last_loss"] < v["first_loss"] for v in manifest["stages"].values())
    if not falling:
        print("the loss did not fall in every stage", file=sys.stderr)
    return 0 if falling else 1


if __name__ == "__main__":
    raise SystemExit(main())
