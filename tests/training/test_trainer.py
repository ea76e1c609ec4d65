"""The loop: resume, gradient accumulation, bad data, schedules and checkpoints in the
LongLLaVA layout (a 9B-style directory as the start, the result loaded by the Engine)."""

import json
import logging
import shutil

import pytest
import torch
from training_fixtures import TINY, qa, write_image, write_jsonl

from model.checkpoint import load_checkpoint, save_checkpoint
from model.longllava import LongLLaVA
from serving.engine import Engine
from training.config import DataSource, TrainConfig
from training.trainer import LocalCheckpoints, Trainer, learning_rate, step_indices, worker_slices


def dataset(tmp_path, n=12) -> DataSource:
    records = [qa(f"<image>\nWhich {k}?", f"it is {k % 5}", image=write_image(tmp_path / f"i{k}.png", k)) for k in range(n)]
    records += [qa(f"Count to {k}.", " ".join(map(str, range(k)))) for k in range(1, 5)]
    return DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", records)))


def config(tmp_path, out="run", **kw) -> TrainConfig:
    base = dict(stage="single", data=[dataset(tmp_path)], output_dir=str(tmp_path / out), architecture=TINY.to_dict(),
                lr=1e-3, batch_size=4, max_steps=6, progress=False)
    return TrainConfig(**{**base, **kw})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Interrupted(Exception):
    pass


class StopAfterFirstSave(LocalCheckpoints):
    def save(self, step, metrics, write):
        super().save(step, metrics, write)
        raise Interrupted(step)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    straight = Trainer(config(tmp_path, "a", save_every=3))
    straight.fit()
    cut = config(tmp_path, "b", save_every=3)
    with pytest.raises(Interrupted):
        Trainer(cut, StopAfterFirstSave(tmp_path / "b" / "checkpoints")).fit()
    resumed = Trainer(cut)
    assert resumed.checkpoints.latest().name == "step-00000003"
    resumed.fit()
    expected, got = weights(straight.model), weights(resumed.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_an_eval_on_start_scores_the_starting_weights_and_changes_no_update(tmp_path):
    plain = Trainer(config(tmp_path, "plain", max_steps=3))
    plain.fit()
    evaluated = Trainer(config(tmp_path, "eval", max_steps=3, eval_data=[dataset(tmp_path)], eval_on_start=True))
    before = evaluated.evaluate()
    evaluated.fit()
    lines = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 0, "eval_loss": before} and [line["step"] for line in lines] == [0, 1, 2, 3]
    assert lines[-1]["eval_loss"] < before
    a, b = weights(plain.model), weights(evaluated.model)
    assert all(torch.equal(a[k], b[k]) for k in a)  # scoring draws no randomness and no data


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = Trainer(config(tmp_path, "big", batch_size=4, grad_accum=1, max_steps=3))
    big.fit()
    small = Trainer(config(tmp_path, "small", batch_size=2, grad_accum=2, max_steps=3))
    small.fit()
    a, b = weights(big.model), weights(small.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # Adam amplifies float noise a little


def test_bad_samples_are_skipped_counted_and_named_once(tmp_path, caplog):
    good = write_image(tmp_path / "good.png", 0)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(qa("<image>\nq", "a", image=good, id=f"g{k}")) for k in range(4)]
    lines += [json.dumps(qa("<image>\nq", "a", image="gone.png", id="missing")),
              json.dumps(qa("<image>\nq", "a", image="bad.png", id="corrupt")), '{"broken": ']
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        run = Trainer(config(tmp_path, data=[DataSource(path=str(path))], batch_size=3, max_steps=6))
        run.fit()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped"] == 2 * 3  # six steps of three draw each of the six samples three times
    assert caplog.text.count("skipping sample missing: missing image") == 1
    assert caplog.text.count("skipping sample corrupt: corrupt image") == 1
    assert caplog.text.count("mixed.jsonl:7: malformed JSON") == 1


def test_data_order_depends_on_step_and_seed_only():
    first = [step_indices(s, 5, 12, seed=3) for s in range(7)]
    assert first == [step_indices(s, 5, 12, seed=3) for s in range(7)]
    stream = sum(first, [])
    assert sorted(stream[:12]) == list(range(12)) and sorted(stream[12:24]) == list(range(12))  # whole epochs
    assert step_indices(0, 5, 12, seed=4) != first[0]
    chunks = [worker_slices(first[0] + [99], r, 2, 3) for r in range(2)]  # 6 samples, 2 workers, micro 3
    assert chunks == [[first[0][:3]], [first[0][3:] + [99]]]


def test_schedules_warm_up_then_decay():
    c = TrainConfig(stage="text", data=[DataSource(path="x")], output_dir="o", lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [learning_rate(c, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_a_longllava_directory_is_a_starting_point_and_the_result_serves(tmp_path):
    """A tiny checkpoint in LongLLaVA-9B's layout (sharded safetensors, an index, the
    remote-code key names, mm_projector, the CLIP tower in a directory of its own) starts
    every stage; the stage's output loads with load_checkpoint and the Engine."""
    torch.manual_seed(0)
    source = LongLLaVA(TINY)
    save_checkpoint(source, tmp_path / "9b-like", max_shard_bytes=30_000)
    shutil.move(tmp_path / "9b-like" / "vision_tower", tmp_path / "clip")
    index = json.loads((tmp_path / "9b-like" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "model.layers.1.moe.router.weight" in index["weight_map"]
    for stage in ("text", "align", "single", "multi", "trajectory"):
        final = Trainer(config(tmp_path, f"from-9b-{stage}", stage=stage, init=str(tmp_path / "9b-like"),
                               vision_tower=str(tmp_path / "clip"), architecture=None, max_steps=1)).fit()
        loaded = load_checkpoint(final)
        assert loaded.config.model_dump(exclude={"mm_vision_tower"}) == TINY.model_dump(exclude={"mm_vision_tower"})
    engine = Engine.from_pretrained(final, device="cpu")
    session = engine.create()
    engine.append(session, "<|startoftext|><|User|>\nhi\n<|startoftext|><|Assistant|>\n")
    assert engine.generate_text(session)[1] in ("eos", "length")


def test_config_refuses_two_starting_points_and_bad_fields(tmp_path):
    with pytest.raises(ValueError, match="either init"):
        config(tmp_path, init="x")
    with pytest.raises(ValueError):
        config(tmp_path, batch_sise=3)
