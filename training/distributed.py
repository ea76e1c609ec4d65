"""Scale-out on Ray Train (V2, Ray's default): the same ``Trainer`` in N workers.

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

from model import ops

from .config import TrainConfig
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
    directory. Starts a local Ray (all sockets on loopback) unless one is running."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps Ray on 127.0.0.1
        ray.init(include_dashboard=False, configure_logging=False)
    use_gpu = (config.device or "").startswith("cuda")
    if not use_gpu:
        ops.training_kernels("cpu")  # builds the C++ scan here once, not in every worker at the same time
    output = Path(config.output_dir).resolve()
    trainer = TorchTrainer(
        worker,
        train_loop_config={"config": config.model_copy(update={"output_dir": str(output)}).model_dump_json()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"{config.stage}-{output.name}",
            storage_path=str(output / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    trainer.fit()
    return output / "model"
