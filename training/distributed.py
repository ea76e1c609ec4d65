"""Scale-out on Ray Train (V2, Ray's default): the same ``Trainer`` in N workers, and the
tower's pretraining (``training.tower.build_tower``) the same way.

``ray.train.torch.TorchTrainer`` starts the workers and the process group (gloo on the
CPU, NCCL on GPUs); the ``Trainer`` then wraps its loss in DDP and shards each step's
samples over the workers. Checkpoints go through ``ray.train.report`` (rank 0 writes the
directory, every rank reports, as Ray requires), and after a worker failure Ray restarts
the workers, which resume from ``ray.train.get_checkpoint()`` at the step it was taken:
the data order depends only on the step, so the run ends as an uninterrupted one would.

The model is replicated, not sharded: the demo model and the 9B model's trainable parts
fit one device each. (FSDP would slot in where the Trainer wraps DDP.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .tower import build_tower
from .trainer import Trainer


class RayCheckpoints:
    """Checkpoints kept by Ray Train in the run's storage."""

    def latest(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint is not None else None

    def save(self, step: int, metrics: dict, write: Callable[[Path], None] | None) -> None:
        import ray.train

        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if write is not None:
                write(Path(directory))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(scalars, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:08d}")


def train_worker(loop_config: dict) -> None:
    """The per-worker function: one ``Trainer`` on this worker's device."""
    import ray.train.torch

    config = TrainConfig.model_validate_json(loop_config["config"])
    Trainer(config, RayCheckpoints(), ray.train.torch.get_device()).fit()


def fit(config: TrainConfig) -> Path:
    """``config`` on this process, or on ``config.num_workers`` Ray Train workers; returns
    the final model's directory."""
    return fit_on_ray(config) if config.num_workers > 1 else Trainer(config).fit()


def fit_on_ray(config: TrainConfig, max_failures: int = 2, worker: Callable[[dict], None] = train_worker) -> Path:
    """Run ``config`` on ``config.num_workers`` Ray Train workers; returns the final model's
    directory."""
    output = Path(config.output_dir).resolve()
    run_on_ray(worker, {"config": config.model_copy(update={"output_dir": str(output)}).model_dump_json()},
               config.num_workers, name=f"{config.stage}-{output.name}", storage=output / "ray",
               use_gpu=(config.device or "").startswith("cuda"), max_failures=max_failures)
    return output / "model"


def tower_worker(loop_config: dict) -> None:
    """The per-worker function of ``build_tower_on_ray``."""
    build_tower(**loop_config)


def build_tower_on_ray(architecture: dict, phases: list[tuple[str, int]], run: Path, lr: float, seed: int,
                       num_workers: int) -> None:
    """``training.tower.build_tower`` data-parallel on ``num_workers`` Ray Train CPU
    workers: the same updates as on one process. It reports no checkpoints, so after a
    worker failure the tower starts over."""
    run = run.resolve()
    loop_config = dict(architecture=architecture, phases=[(str(Path(r).resolve()), n) for r, n in phases],
                       run=str(run), lr=lr, seed=seed)
    run_on_ray(tower_worker, loop_config, num_workers, name="tower", storage=run / "ray", use_gpu=False)


def run_on_ray(worker: Callable[[dict], None], loop_config: dict, num_workers: int, name: str, storage: Path,
               use_gpu: bool, max_failures: int = 2) -> None:
    """``worker(loop_config)`` on ``num_workers`` Ray Train workers in one process group.
    Starts a local Ray (all sockets on loopback) unless one is running."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps Ray on 127.0.0.1
        ray.init(include_dashboard=False, configure_logging=False)
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=max_failures)),
    )
    trainer.fit()
