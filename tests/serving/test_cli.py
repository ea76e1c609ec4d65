"""``python -m serving`` in real processes: mistakes are usage errors before the model
loads, and the model's output reaches the terminal with control characters escaped."""

import io

import numpy as np
import pytest
from PIL import Image

from serving.__main__ import printable


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    where = tmp_path_factory.mktemp("cli")
    (where / "notes.png").write_text("not an image")
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    (where / "torn.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (where / "empty-checkpoint").mkdir()
    return where


MISTAKES = {
    "missing --model": (["--model", "{d}/nope"], "--model {d}/nope: no such directory"),
    "--model without a config": (["--model", "{d}/empty-checkpoint"], "not a checkpoint directory (it has no config.json)"),
    "missing --image": (["--image", "{d}/nope.png"], "--image {d}/nope.png: No such file or directory"),
    "--image that is not an image": (["--image", "{d}/notes.png"], "cannot identify image file"),
    "--image cut short": (["--image", "{d}/torn.png"], "--image {d}/torn.png: the image cannot be decoded: image file is truncated"),
    "--max-new-tokens 0": (["--max-new-tokens", "0"], "--max-new-tokens 0: Input should be greater than or equal to 1"),
    "--top-p 0": (["--top-p", "0"], "--top-p 0.0: Input should be greater than 0"),
}


@pytest.fixture(scope="module")
def runs(cli, files):
    """Every mistake and one good run, started together (each process spends seconds importing)."""
    started = {name: cli.start("serving", *(a.format(d=files) for a in args)) for name, (args, _) in MISTAKES.items()}
    started["good"] = cli.start("serving", "--max-new-tokens", "32")
    return {name: cli.finish(process) for name, process in started.items()}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_are_one_line_usage_errors_before_the_model_loads(cli, runs, files, mistake):
    done = runs[mistake]
    cli.assert_usage_error(done, MISTAKES[mistake][1].format(d=files))
    assert "engine: LongLLaVA" not in done.stderr  # the engine logs this line once the model is loaded


def test_model_output_is_printed_with_control_characters_escaped(runs):
    done = runs["good"]
    assert done.returncode == 0, done.stderr
    assert "appended" in done.stderr and "tokens in history" in done.stderr
    # the model may emit any bytes (the byte tokenizer has control characters); none reach the terminal raw
    assert not [c for c in done.stdout if not c.isprintable() and c not in "\n\t"]


def test_printable_escapes_everything_a_terminal_would_act_on():
    text = "ok\tfine\nnext \x1b[2J\x1b]0;title\x07\r\x00\x7f\u202eevil\u200b é 字 🙂 \\x1b"
    assert printable(text) == "ok\tfine\nnext \\x1b[2J\\x1b]0;title\\x07\\r\\x00\\x7f\\u202eevil\\u200b é 字 🙂 \\x1b"
