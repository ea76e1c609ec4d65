"""Stage recipes on a tiny model: what trains, that frozen weights stay bit-identical, and
that every stage can overfit a 16-sample set."""

import json

import pytest
import torch
from training_fixtures import TINY, qa, write_image, write_jsonl

from training.config import DataSource, TrainConfig
from training.stages import RECIPES, freeze_for
from training.trainer import Trainer


def sixteen(stage: str, root) -> list[dict]:
    """16 samples of the kind a stage trains on, each with its own answer."""
    answers = [f"ans{k:02d}{'xyzw'[k % 4]}" for k in range(16)]
    image = lambda k, j=0: write_image(root / f"s{k}-{j}.png", 100 * k + j)  # noqa: E731
    make = {
        "text": lambda k: qa(f"Question {k}?", answers[k]),
        "align": lambda k: qa("<image>\nDescribe.", answers[k], image=image(k)),
        "single": lambda k: qa(f"<image>\nWhat is {k % 3}?", answers[k], image=image(k)),
        "multi": lambda k: [
            qa("<image><image>\nCompare.", answers[k], image=[image(k), image(k, 1)]),
            qa("<video>\nWatch.", answers[k], video=[image(k, j) for j in range(3)]),
        ][k % 2],
        "trajectory": lambda k: {
            "image": [image(k, j) for j in range(3)],
            "conversations": [
                turn for j in range(3) for turn in (
                    {"from": "human", "value": ("Act.\n" if j == 0 else "") + "<image>\nStep."},
                    {"from": "gpt", "value": "wait()" if j < 2 else f'type("{answers[k]}")'},
                )
            ],
        },
    }[stage]
    return [make(k) for k in range(16)]


def config(tmp_path, stage: str, **kw) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / f"{stage}.jsonl", sixteen(stage, tmp_path))
    base = dict(stage=stage, data=[DataSource(path=str(data))], output_dir=str(tmp_path / "run"),
                architecture=TINY.to_dict(), batch_size=8, lr=3e-3, warmup_ratio=0.0, schedule="constant",
                max_length=1024, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("stage", list(RECIPES))
def test_requires_grad_follows_the_recipe_and_frozen_weights_stay_put(tmp_path, stage):
    trainer = Trainer(config(tmp_path, stage, max_steps=3))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for name, p in trainer.model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] in RECIPES[stage]), name
    trainer.fit()
    changed = {n.split(".")[0] for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    for name, p in trainer.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name]), f"{stage}: frozen {name} moved"
    assert changed == set(RECIPES[stage])


def test_freeze_for_refuses_unknown_parts():
    from model.longllava import LongLLaVA

    with pytest.raises(ValueError, match="unknown model parts"):
        freeze_for(LongLLaVA(TINY), ("tower",))


@pytest.mark.parametrize("stage", [s for s in RECIPES if s != "align"])
def test_each_stage_overfits_sixteen_samples(tmp_path, stage):
    """The loss on the training set falls by at least 90%."""
    run = Trainer(config(tmp_path, stage, max_steps=60, eval_data=[DataSource(path=str(tmp_path / f"{stage}.jsonl"))]))
    first = run.evaluate()
    run.fit()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
    assert last <= 0.1 * first, (first, last)


def test_alignment_overfits_through_a_trained_llm(tmp_path):
    """Stage 1 trains the projector alone, so, as in LongLLaVA, it starts from an LLM that
    has learnt the answers' language: here the text stage teaches it to repeat the text
    before "Describe.", and alignment must then make each image read as its answer.

    The frozen LLM bounds what the projector can reach: the images can at best read as
    well as the answers' own text does. So the loss must close at least 90% of the gap
    between its start and that floor (the text stage's loss on the same answers as text)."""
    records = sixteen("align", tmp_path)
    texts = DataSource(path=str(write_jsonl(tmp_path / "text.jsonl", [
        qa(f"{r['conversations'][1]['value']}\nDescribe.", r["conversations"][1]["value"]) for r in records])))
    llm = Trainer(config(tmp_path / "t", "text", max_steps=150, data=[texts], eval_data=[texts])).fit()
    floor = json.loads((tmp_path / "t" / "run" / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
    data = DataSource(path=str(write_jsonl(tmp_path / "align.jsonl", records)))
    run = Trainer(config(tmp_path / "a", "align", init=str(llm), architecture=None, data=[data], eval_data=[data],
                         max_steps=150, lr=1e-2))
    first = run.evaluate()
    run.fit()
    last = json.loads((tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
    assert first - last >= 0.9 * (first - floor), (first, last, floor)
