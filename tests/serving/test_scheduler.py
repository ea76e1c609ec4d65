"""The engine's model thread: generations started by different callers at different times
share one forward per token, each still gets exactly its own events, and an append goes
in between decode steps rather than after every generation."""

from __future__ import annotations

import threading

import pytest

from model.default import default_model
from model.prompt import Text, user_message
from serving.engine import Engine
from serving.sampling import SamplingParams

TOKENS = 48


@pytest.fixture(scope="module")
def engine():
    return Engine(default_model(), device="cpu")


def prompted(engine, text: str) -> str:
    s = engine.create()
    engine.append(s, user_message([Text(text)]))
    return s


def test_concurrent_generations_share_the_forwards(engine):
    sampling = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    prompts = ["one", "a second, longer prompt", "three " * 20, "4"]
    alone = [list(engine.generate(prompted(engine, p), sampling)) for p in prompts]
    sessions = [prompted(engine, p) for p in prompts]
    start, results = threading.Barrier(len(sessions)), {}

    def generate(s: str) -> None:
        start.wait()
        results[s] = list(engine.generate(s, sampling))

    steps = engine.scheduler.steps
    threads = [threading.Thread(target=generate, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[s] for s in sessions] == alone  # each caller got exactly its own events
    # one after another they would take 4 x 48 forwards; together, about 48
    assert engine.scheduler.steps - steps < 2 * TOKENS


def test_an_append_goes_between_decode_steps(engine):
    busy, other = prompted(engine, "generate for a long time"), engine.create()
    first, events = threading.Event(), []

    def generate() -> None:
        for event in engine.generate(busy, SamplingParams(max_new_tokens=400, ignore_eos=True)):
            events.append(event)
            first.set()

    t = threading.Thread(target=generate)
    t.start()
    first.wait()
    engine.append(other, user_message([Text("an observation while the other decodes")]))
    assert len(events) < 400  # the append did not wait for the generation to end
    t.join()
    assert events[-1].finish_reason == "length" and events[-1].tokens == 400


def test_a_generation_left_early_leaves_the_session_usable(engine):
    s = prompted(engine, "stop listening after three tokens")
    before = engine.session_info(s).length
    stream = engine.generate(s, SamplingParams(max_new_tokens=200, ignore_eos=True))
    taken = [next(stream) for _ in range(3)]
    stream.close()  # withdrawn from the batch; what it had decoded joined the history
    assert all(e.token_id is not None for e in taken)
    grown = engine.session_info(s).length - before
    assert 3 <= grown < 200
    assert engine.append(s, "next").length == before + grown + 4
