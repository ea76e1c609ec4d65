"""The demo pipeline at smoke size (the CI run of ``python -m training.pipeline --preset
smoke``), and the embedded model it ships."""

import json
import re

import pytest
import torch

from envs.tasks.click_target import LABELS
from model.checkpoint import load_checkpoint, save_checkpoint
from model.default import DEFAULT_CONFIG, WEIGHTS_DIR, default_model
from model.longllava import LongLLaVA
from training import synthetic
from training.pipeline import EVAL_SEED, PRESETS, RECALL_SPANS, interpolate, loss_ends, make_data, run, stage_configs


def test_smoke_pipeline_builds_a_model_whose_loss_falls_in_every_stage(tmp_path, monkeypatch):
    seeds = []
    played = synthetic.episode
    monkeypatch.setattr(synthetic, "episode", lambda task, seed, **kw: seeds.append(seed) or played(task, seed, **kw))
    manifest = run("smoke", tmp_path)
    assert seeds and max(seeds) < EVAL_SEED  # no synthetic screen is an evaluation episode's
    assert list(manifest["stages"]) == ["tower", "align", "read", "click", "multi", "recall", "trajectory"]
    for stage, values in manifest["stages"].items():
        assert values["last_loss"] < values["first_loss"], stage
    tower_log = (tmp_path / "runs" / "tower" / "metrics.jsonl").read_text().splitlines()
    phases = PRESETS["smoke"].tower_toolbar_steps + PRESETS["smoke"].tower_steps  # toolbars, then the mix
    assert [json.loads(line)["step"] for line in tower_log] == list(range(1, phases + 1))
    buttons = {label[:4].ljust(4) for label in LABELS}
    for line in (tmp_path / "data" / "screens" / "toolbars.jsonl").read_text().splitlines():
        names = {cell[synthetic.LABEL_SLOTS] for cell in json.loads(line)["cells"]} - {synthetic.EMPTY * 4}
        assert names and names <= buttons  # toolbars alone: every label named is a button's
    recalls = (tmp_path / "data" / "screens" / "recalls.jsonl").read_text().splitlines()
    gaps = {len(json.loads(line)["image"]) - 1 for line in recalls}  # the code's screen, then the gap
    assert gaps <= set(RECALL_SPANS) and max(gaps) > 16  # codes asked from far back too
    model = load_checkpoint(tmp_path / "model")
    assert all(p.dtype == torch.float16 for p in model.parameters())  # shipped in half precision
    written = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert written["data_sha256"] == manifest["data_sha256"] and len(written["data_sha256"]) == 64
    assert written["seed"] == 0 and written["command"].startswith("python -m training.pipeline")
    assert written["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", written["commit"])  # None outside git
    # no training data came from the evaluation seeds
    for line in (tmp_path / "data" / "trajectories.jsonl").read_text().splitlines():
        episode = json.loads(line)["image"][0]
        meta = json.loads((__import__("pathlib").Path(episode).parent / "meta.json").read_text())
        assert meta["seed"] < EVAL_SEED
    # the same command again resumes: data, tower and every finished stage are kept
    again = run("smoke", tmp_path)
    assert again["data_sha256"] == manifest["data_sha256"]
    assert {s: (v["first_loss"], v["last_loss"]) for s, v in again["stages"].items()} == \
        {s: (v["first_loss"], v["last_loss"]) for s, v in manifest["stages"].items()}
    resumed = load_checkpoint(tmp_path / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


def test_whether_a_run_learnt_is_judged_on_its_eval_set_or_five_logged_losses_at_each_end(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    for curve, ends in (([0.05, 1.0, 1.0, 1.0, 0.95, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4], (0.8, 0.4)),  # a lucky first step
                        ([2.0, 1.0, 3.0], (2.0, 3.0))):  # a short run: one at each end
        metrics.write_text("".join(json.dumps({"step": k, "loss": x}) + "\n" for k, x in enumerate(curve)))
        assert loss_ends(metrics) == pytest.approx(ends)
    # with an eval set scored before the first step, its first and last scores decide
    rows = [{"step": 0, "eval_loss": 2.5}, {"step": 1, "loss": 0.05}, {"step": 2, "loss": 0.6, "eval_loss": 0.7}]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert loss_ends(metrics) == (2.5, 0.7)
    # a run rerun from step 0 after an unfinished one appends its eval rows to the same file
    metrics.write_text("".join(json.dumps(row) + "\n" for row in [{"step": 1, "loss": 3.0}, *rows]))
    assert loss_ends(metrics) == (2.5, 0.7)
    metrics.write_text("")
    with pytest.raises(ValueError, match="logs no loss"):
        loss_ends(metrics)


def test_the_shipped_weights_lie_between_the_last_run_and_the_one_it_started_from(tmp_path):
    from training_fixtures import TINY

    for seed in (0, 1):
        torch.manual_seed(seed)
        save_checkpoint(LongLLaVA(TINY), tmp_path / str(seed))
    start, tuned = (load_checkpoint(tmp_path / str(seed)).state_dict() for seed in (0, 1))
    for weight in (0.0, 0.5, 1.0):
        mixed = interpolate(tmp_path / "0", tmp_path / "1", weight).state_dict()
        assert mixed.keys() == tuned.keys()
        for name, value in mixed.items():
            torch.testing.assert_close(value, start[name] + weight * (tuned[name] - start[name]), rtol=0, atol=1e-6)
    assert not torch.equal(start["llm.lm_head.weight"], tuned["llm.lm_head.weight"])


def test_a_toolbar_with_its_named_button_alone_keeps_that_button_and_the_question(tmp_path):
    from envs.actions import Click, parse_action

    for seed in range(10):
        ep = synthetic.episode("ClickTarget", seed, difficulty="easy")
        alone = synthetic.named_alone(ep)
        (button,) = alone.elements
        assert button.box == ep.target and f'"{button.label}"' in alone.instruction == ep.screens[0].instruction
    path = synthetic.clicks(synthetic.Writer(tmp_path), 8, seed=3, alone_share=0.5)
    for record in map(json.loads, path.read_text().splitlines()):
        question, answer = (turn["value"] for turn in record["conversations"])
        rationale, action = answer.split("\n")  # the buttons read out, then the click
        click = parse_action(action)
        assert question.startswith("<image>\nClick the ") and isinstance(click, Click)
        assert f"{click.target} {click.x},{click.y}" in rationale and rationale.count(";") in (0, 2)  # 1 or 3
        assert (tmp_path / record["image"][0]).is_file()


@pytest.mark.skipif(not (WEIGHTS_DIR / "config.json").exists(), reason="the demo weights are not built")
def test_the_shipped_model_is_small_loadable_and_documented():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 50 * 1024**2
    model = default_model()
    assert model.config.model_dump(exclude={"mm_vision_tower"}) == DEFAULT_CONFIG.model_dump(exclude={"mm_vision_tower"})
    assert all(p.dtype == torch.float32 for p in model.parameters())  # widened on load
    manifest = json.loads((WEIGHTS_DIR / "manifest.json").read_text())
    assert {"command", "seed", "data_sha256", "commit", "evaluation"} <= set(manifest)
    random = default_model(pretrained=False)
    assert not torch.equal(random.llm.lm_head.weight, model.llm.lm_head.weight)


def test_with_workers_each_stage_splits_its_steps_samples_and_keeps_their_number(tmp_path):
    """``--workers 2``: the same samples per optimizer step as one worker (so the same
    updates: tests/training/test_distributed.py), half of them on each Ray Train worker."""
    files = {name: tmp_path / f"{name}.jsonl" for name in ("captions", "codes", "questions", "sequences", "recalls", "clicks", "texts", "trajectories")}
    record = json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    for path in files.values():  # each run's eval set is the first records of its data, counted when configured
        path.write_text((record + "\n") * 64)
    one, two = (stage_configs(PRESETS["demo"], files, tmp_path, seed=0, workers=n) for n in (1, 2))
    assert [c.num_workers for c in two] == [2] * len(PRESETS["demo"].steps)
    assert [c.samples_per_step for c in two] == [c.samples_per_step for c in one] == list(PRESETS["demo"].batch.values())
    assert [c.batch_size * c.grad_accum for c in two] == [c.batch_size * c.grad_accum // 2 for c in one]
    assert [c.batch_size for c in two if c.output_dir.endswith("recall")] == [1]  # long samples one at a time
    assert all(c.eval_on_start and c.eval_data == [c.data[0].model_copy(update={"fraction": 0.25})] for c in one)
    with pytest.raises(ValueError, match="do not divide over 3 workers"):
        stage_configs(PRESETS["demo"], files, tmp_path, seed=0, workers=3)


def test_data_made_on_two_processes_is_the_data_made_on_one(tmp_path):
    serial = make_data(PRESETS["smoke"], tmp_path / "one", seed=0, workers=1)
    parallel = make_data(PRESETS["smoke"], tmp_path / "two", seed=0, workers=2)
    assert serial.keys() == parallel.keys()
    for name in serial:  # trajectories name their screenshots by absolute path
        one = serial[name].read_text().replace(str(tmp_path / "one"), "ROOT")
        assert one == parallel[name].read_text().replace(str(tmp_path / "two"), "ROOT"), name
    images = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert images == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png"))
    assert all((tmp_path / "one" / p).read_bytes() == (tmp_path / "two" / p).read_bytes() for p in images)
    assert make_data(PRESETS["smoke"], tmp_path / "two", seed=0, workers=2) == parallel  # finished: kept
