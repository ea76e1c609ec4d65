"""Ray Train: real workers on a local Ray (gloo on the CPU), checked against one process."""

import os
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import TINY, qa, write_image, write_jsonl

from model.checkpoint import load_checkpoint
from training.config import DataSource, TrainConfig
from training.distributed import RayCheckpoints, fit_on_ray
from training.trainer import Trainer

ray = pytest.importorskip("ray")


def config(tmp_path, out, **kw) -> TrainConfig:
    records = [qa(f"<image>\nWhich {k}?", f"it is {k % 5}", image=write_image(tmp_path / f"i{k}.png", k)) for k in range(10)]
    records += [qa(f"Count to {k}.", " ".join(map(str, range(k)))) for k in range(1, 7)]
    data = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", records)))
    base = dict(stage="single", data=[data], output_dir=str(tmp_path / out), architecture=TINY.to_dict(),
                lr=1e-3, max_steps=4, save_every=2, progress=False)
    return TrainConfig(**{**base, **kw})


def final_weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict()


def assert_close(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    # Adam divides each gradient by its own running scale, so where a gradient is near zero
    # the workers' different summation order can move a weight by a visible fraction of a
    # step (4e-5 and 1.1e-4 measured, on two CPUs); training on the wrong samples moves
    # weights by ~lr x steps (4e-3), eight times this bound
    assert worst < 5e-4, worst


def test_two_workers_give_the_weights_of_one_with_the_same_global_batch(tmp_path, local_ray):
    one = Trainer(config(tmp_path, "one", batch_size=4)).fit()
    two = fit_on_ray(config(tmp_path, "two", batch_size=2, num_workers=2))
    assert_close(final_weights(one), final_weights(two))


class CrashOnceAfterSaving(RayCheckpoints):
    """A worker failure mid-run: rank 1 dies after the first checkpoint, once."""

    def __init__(self, marker: Path):
        self.marker = marker

    def save(self, step, metrics, write):
        super().save(step, metrics, write)
        import ray.train

        if ray.train.get_context().get_world_rank() == 1 and not self.marker.exists():
            self.marker.write_text(str(step))
            os._exit(1)  # the process dies, as on a lost node


def crashing_worker(loop_config: dict) -> None:
    import ray.train.torch

    config = TrainConfig.model_validate_json(loop_config["config"])
    Trainer(config, CrashOnceAfterSaving(Path(config.output_dir) / "crashed"), ray.train.torch.get_device()).fit()


def test_a_run_resumes_after_a_worker_dies(tmp_path, local_ray):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    straight = Trainer(config(tmp_path, "straight", batch_size=4)).fit()
    cut = config(tmp_path, "cut", batch_size=2, num_workers=2)
    resumed = fit_on_ray(cut, max_failures=1, worker=crashing_worker)
    assert (Path(cut.output_dir) / "crashed").read_text() == "2"
    assert_close(final_weights(straight), final_weights(resumed))
