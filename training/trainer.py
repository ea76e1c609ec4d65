"""The training loop that every stage runs, on one process or as one Ray Train worker.

Data order is a pure function of the seed and the optimizer step: the samples form an
endless stream of seeded permutations of the dataset, step ``s`` takes the next
``samples_per_step`` of them, and each worker's micro-batches are fixed slices of those.
So a run resumed at step ``s`` draws exactly the batches an uninterrupted run would,
and N workers see the same global batch as one.

Each step divides the summed token loss by the labelled-token count of the whole step
(all micro-batches, all workers): gradient accumulation and data parallelism then give
the update one big batch would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, Dataset
from tqdm import tqdm

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import LongLLaVAConfig
from model.default import DEFAULT_CONFIG
from model.longllava import LongLLaVA
from model.tokenizer import load_tokenizer

from .collate import Batch, Collator
from .config import DataSource, TrainConfig
from .data import LlavaDataset
from .loss import LossModel
from .stages import freeze_for
from .state import load_training_state, save_training_state

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- setup
def build_model(config: TrainConfig, device: torch.device) -> LongLLaVA:
    """The starting weights: a checkpoint, or a seeded random model of ``architecture``."""
    if config.init is not None:
        return load_checkpoint(config.init, config.vision_tower, device=device, dtype=torch.float32)
    architecture = LongLLaVAConfig.model_validate(config.architecture) if config.architecture else DEFAULT_CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return LongLLaVA(architecture).to(device)


def build_dataset(sources: list[DataSource], model_config: LongLLaVAConfig) -> Dataset:
    tile = model_config.vision_config.image_size if model_config.vision_config else 336
    return ConcatDataset([LlavaDataset([s.path], tile, s.image_folder, s.fraction, s.mask_history) for s in sources])


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then the schedule down to ``min_lr_ratio * lr`` at the last step."""
    warmup = math.ceil(config.warmup_ratio * total)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[config.schedule]
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * shape)


def step_indices(step: int, per_step: int, n: int, seed: int) -> list[int]:
    """The dataset indices of optimizer step ``step``: the next slice of an endless stream
    of seeded permutations."""
    out, k = [], step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = order[offset : offset + per_step - len(out)].tolist()
        out += take
        k += len(take)
    return out


def worker_slices(indices: list[int], rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This worker's micro-batches of a step: slice ``m * world + rank`` of ``batch_size``."""
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return chunks[rank::world]


# ----------------------------------------------------------------------------- checkpoints
class Checkpoints(Protocol):
    def latest(self) -> Path | None: ...

    def save(self, step: int, metrics: dict, write: Callable[[Path], None] | None) -> None:
        """Called on every worker; ``write`` (rank 0 only) fills a directory."""


@dataclass
class LocalCheckpoints:
    """``output_dir/checkpoints/step-NNNNNNNN``, the newest ``keep`` kept; a directory
    counts once its ``trainer_state.json`` is written (the last file)."""

    root: Path
    keep: int = 2

    def _complete(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step-*") if (p / "trainer_state.json").exists())

    def latest(self) -> Path | None:
        done = self._complete()
        return done[-1] if done else None

    def save(self, step: int, metrics: dict, write: Callable[[Path], None] | None) -> None:
        if write is None:
            return
        write(self.root / f"step-{step:08d}")
        for old in self._complete()[: -self.keep]:
            for f in sorted(old.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            old.rmdir()


# ----------------------------------------------------------------------------- the loop
class Metrics:
    """JSONL lines in ``metrics.jsonl``, and TensorBoard scalars where it is installed."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.board = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class Trainer:
    """One stage's run: ``Trainer(config).fit()`` returns the final model's directory."""

    def __init__(self, config: TrainConfig, checkpoints: Checkpoints | None = None, device: torch.device | None = None):
        self.config = config
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if self.world != config.num_workers:
            raise ValueError(f"the config asks for {config.num_workers} workers but {self.world} are running")
        self.device = device or torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = checkpoints or LocalCheckpoints(self.output_dir / "checkpoints")

        self.model = build_model(config, self.device)
        freeze_for(self.model, config.parts)
        self.tokenizer = load_tokenizer(config.tokenizer or config.init, builtin=self.model.config.builtin_tokenizer)
        self.collate = Collator(self.model.config, self.tokenizer, config.max_length)
        self.train_set = build_dataset(config.data, self.model.config)
        self.eval_set = build_dataset(config.eval_data, self.model.config) if config.eval_data else None
        if len(self.train_set) == 0:
            raise ValueError("the training data holds no usable records")
        self.total_steps = config.max_steps or math.ceil(config.epochs * len(self.train_set) / config.samples_per_step)

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
        self.loss_model: torch.nn.Module = LossModel(self.model, config.gradient_checkpointing)
        if dist.is_initialized():
            # experts a batch routes no token to, and an idle projector on text batches, get no gradient
            self.loss_model = DistributedDataParallel(self.loss_model, find_unused_parameters=True)
        self.skipped: set[str] = set()
        self.skipped_count = 0

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        on_cuda = self.device.type == "cuda" and self.config.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_cuda)

    def _batch(self, dataset: Dataset, indices: list[int]) -> Batch:
        batch = self.collate([dataset[i] for i in indices])
        for s in batch.skipped:
            self.skipped_count += 1
            if s.id not in self.skipped and self.rank == 0:
                log.warning("skipping sample %s: %s", s.id, s.reason)
            self.skipped.add(s.id)
        return batch

    def _train_step(self, step: int) -> dict:
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, step, self.total_steps)
        indices = step_indices(step, config.samples_per_step, len(self.train_set), config.seed)
        batches = [self._batch(self.train_set, chunk) for chunk in worker_slices(indices, self.rank, self.world, config.batch_size)]
        labelled = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
        tokens = sum(b.tokens for b in batches)
        labelled_all, tokens_all = _all_sum([labelled, tokens], self.device)
        loss_sum = 0.0
        for k, batch in enumerate(batches):
            if not len(batch):
                continue
            last = k == len(batches) - 1
            ddp = isinstance(self.loss_model, DistributedDataParallel)
            sync = self.loss_model.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync, self._autocast():
                loss, _ = self.loss_model(batch)
            # DDP averages gradients over workers; the world factor turns that into a sum
            (loss * self.world / max(labelled_all, 1)).backward()
            loss_sum += float(loss.detach())
        grad_norm = None
        if config.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        (loss_all,) = _all_sum([loss_sum], self.device)
        return {"loss": loss_all / max(labelled_all, 1), "lr": self.optimizer.param_groups[0]["lr"],
                "tokens": int(tokens_all), "grad_norm": grad_norm}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the whole eval set, shared among the workers."""
        if self.eval_set is None:
            return None
        self.model.eval()
        mine = list(range(len(self.eval_set)))[self.rank :: self.world]
        loss_sum, count = 0.0, 0
        for i in range(0, len(mine), self.config.batch_size):
            batch = self._batch(self.eval_set, mine[i : i + self.config.batch_size])
            if len(batch):
                with self._autocast():
                    loss, n = LossModel(self.model)(batch)
                loss_sum, count = loss_sum + float(loss), count + n
        self.model.train()
        loss_sum, count = _all_sum([loss_sum, count], self.device)
        return loss_sum / max(count, 1)

    def _skipped_total(self) -> int:
        return int(_all_sum([self.skipped_count], self.device)[0])

    def _save(self, step: int, metrics: dict) -> None:
        skipped = self._skipped_total()

        def write(path: Path) -> None:
            save_training_state(path, self.model, self.optimizer, step, skipped)

        self.checkpoints.save(step, metrics, write if self.rank == 0 else None)

    # ------------------------------------------------------------------ fit
    def fit(self) -> Path:
        config = self.config
        start = 0
        resume_from = self.checkpoints.latest()
        if resume_from is not None:
            start, skipped = load_training_state(resume_from, self.model, self.optimizer)
            self.skipped_count = skipped if self.rank == 0 else 0  # the saved count is the run's total
            if self.rank == 0:
                log.info("resuming %s stage at step %d from %s", config.stage, start, resume_from)
        metrics = Metrics(self.output_dir, self.rank == 0)
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=start, desc=config.stage, unit="step",
                   disable=not (config.progress and self.rank == 0), dynamic_ncols=True)
        try:
            if config.eval_on_start and start == 0 and self.eval_set is not None:
                metrics.write(0, {"eval_loss": self.evaluate()})
            began, tokens_seen = time.perf_counter(), 0  # tokens_per_s counts training alone
            for step in range(start, self.total_steps):
                values = self._train_step(step)
                tokens_seen += values["tokens"]
                values["tokens_per_s"] = tokens_seen / (time.perf_counter() - began)
                values["skipped"] = self._skipped_total()
                done = step + 1
                if config.eval_every and done % config.eval_every == 0 and done < self.total_steps:
                    values["eval_loss"] = self.evaluate()
                if done == self.total_steps and self.eval_set is not None:
                    values["eval_loss"] = self.evaluate()
                if done % config.log_every == 0 or done in (1, self.total_steps) or "eval_loss" in values:
                    metrics.write(done, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
                bar.update()
                if (config.save_every and done % config.save_every == 0) or done == self.total_steps:
                    self._save(done, values)
        finally:
            bar.close()
            metrics.close()
        final = self.output_dir / "model"
        if self.rank == 0:
            save_checkpoint(self.model, final)
            (self.output_dir / "train_config.json").write_text(config.to_json() + "\n", encoding="utf-8")
        return final

