"""The in-process Engine on the embedded default model's architecture with random weights
(`default_model(pretrained=False)`): behaviour is checked against full recomputes."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from model.default import default_model
from model.prompt import Image, Text, Video, user_message
from model.tokenizer import tokenize_prompt
from serving.engine import Engine
from serving.errors import SessionBusyError, UnknownSessionError
from serving.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine():
    return Engine(default_model(pretrained=False), device="cpu")


def screenshot(seed: int, size=(160, 120)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def full_pass_greedy(engine, prompt_pieces, n):
    """Greedy tokens by recomputing the whole sequence from scratch at every token."""
    from model.prompt import render_pieces

    text, images = render_pieces(prompt_pieces)
    ids = tokenize_prompt(engine.tokenizer, text)
    feats = engine.model.encode_images(images) if images else None
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = engine.model.llm.prefill(engine.model.new_state(), engine.model.embed(ids + out, feats))
            out.append(int(logits.argmax()))
    return out


def test_append_costs_only_the_new_tokens(engine):
    s = engine.create()
    first = engine.append(s, user_message([Text("task: remember the code")]))
    assert first.step == 1 and first.length == first.tokens
    obs = engine.append(s, user_message([Image(screenshot(0)), Text("step 1")]))
    assert obs.step == 2 and obs.length == first.length + obs.tokens
    # one image is image_tokens rows (36 for the embedded model); the rest is the template and text
    expected_text = len(tokenize_prompt(engine.tokenizer, "<|startoftext|><|User|>\n<img></img>step 1\n<|startoftext|><|Assistant|>\n"))
    assert obs.tokens == engine.model.config.image_tokens + expected_text
    assert engine.state_of(s).length == obs.length
    engine.close(s)


def test_greedy_generation_equals_full_recompute(engine):
    pieces = user_message([Image(screenshot(1)), Text("what is shown?")])
    s = engine.create()
    engine.append(s, pieces)
    prompt_length = engine.session_info(s).length
    events = list(engine.generate(s, SamplingParams(max_new_tokens=6, ignore_eos=True)))
    assert events[-1].finish_reason == "length" and events[-1].token_id is None
    expected = full_pass_greedy(engine, pieces, 6)
    assert [e.token_id for e in events[:-1]] == expected
    assert "".join(e.text for e in events) == engine.tokenizer.decode(expected)
    # every generated token joined the history, and the step grew to cover them
    info = engine.session_info(s)
    assert info.length == prompt_length + 6 and info.step == 1


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(engine):
    s = engine.create()
    engine.append(s, user_message([Text("hello")]))
    a = engine.fork(s)
    b = engine.fork(s)
    c = engine.fork(s)
    hot = SamplingParams(max_new_tokens=8, temperature=1.5, seed=7, ignore_eos=True)
    assert engine.generate_text(a, hot) == engine.generate_text(b, hot)
    nucleus = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True)
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    assert engine.generate_text(c, nucleus) == engine.generate_text(s, greedy)


def test_stop_strings_and_eos_end_generation(engine):
    s = engine.create()
    engine.append(s, user_message([Text("hello")]))
    probe = engine.fork(s)
    text, _ = engine.generate_text(probe, SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop = text[3:5]
    assert stop
    cut, reason = engine.generate_text(s, SamplingParams(max_new_tokens=12, stop=(stop,), ignore_eos=True))
    assert reason == "stop" and cut == text[: text.index(stop)]

    # an engine whose LM head always prefers EOS stops at once, with no text
    model = default_model(pretrained=False)
    eos = torch.nn.functional.one_hot(torch.tensor(model.config.eos_token_ids[0]), model.config.vocab_size) * 1e4
    model.llm.lm_head.register_forward_hook(lambda module, inputs, logits: logits + eos)
    eos_engine = Engine(model, device="cpu")
    e = eos_engine.create()
    eos_engine.append(e, user_message([Text("hello")]))
    before = eos_engine.session_info(e).length
    assert eos_engine.generate_text(e, SamplingParams(max_new_tokens=5)) == ("", "eos")
    assert eos_engine.session_info(e).length == before + 1  # the EOS is in the history


def test_fork_diverges_without_touching_parent(engine):
    s = engine.create()
    engine.append(s, user_message([Image(screenshot(2)), Text("a")]))
    child = engine.fork(s)
    engine.append(child, user_message([Text("only in the child")]))
    assert engine.session_info(child).step == 2 and engine.session_info(s).step == 1
    assert engine.state_of(s).length < engine.state_of(child).length
    # the parent continues exactly as a session that never forked
    twin = engine.create()
    engine.append(twin, user_message([Image(screenshot(2)), Text("a")]))
    greedy = SamplingParams(max_new_tokens=5, ignore_eos=True)
    assert engine.generate_text(s, greedy) == engine.generate_text(twin, greedy)
    assert engine.generate_text(child, greedy) != engine.generate_text(engine.fork(s), greedy)


def test_rollback_then_reappend_equals_original(engine):
    s = engine.create()
    steps = [user_message([Image(screenshot(i)), Text(f"step {i}")]) for i in range(3)]
    for p in steps:
        engine.append(s, p)
        engine.generate_text(s, SamplingParams(max_new_tokens=3, ignore_eos=True))
    reference = engine.fork(s)
    engine.append(s, user_message([Text("a detour")]))
    engine.generate_text(s, SamplingParams(max_new_tokens=4, ignore_eos=True))
    back = engine.rollback(s, 3)
    assert back.step == 3 and back.length == engine.session_info(reference).length
    probe = user_message([Text("next")])
    engine.append(s, probe)
    engine.append(reference, probe)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert engine.generate_text(s, greedy) == engine.generate_text(reference, greedy)
    engine.rollback(s, 0)
    assert engine.session_info(s).length == 0


def test_generation_after_rollback_continues_from_that_step(engine):
    """A rollback restores the last hidden row too, so the session can generate at once,
    exactly as it would have at that step; the empty history has nothing to generate from."""
    s = engine.create()
    engine.append(s, "one")
    at_one = engine.fork(s)
    engine.append(s, "two")
    engine.rollback(s, 1)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert engine.generate_text(s, greedy) == engine.generate_text(at_one, greedy)
    engine.rollback(s, 0)
    with pytest.raises(ValueError, match="append a prompt"):
        list(engine.generate(s))


def test_step_numbers_make_appends_idempotent(engine):
    s = engine.create()
    first = engine.append(s, "observation one", step=1)
    again = engine.append(s, "observation one", step=1)
    assert again.tokens == 0 and again.length == first.length and again.step == 1
    with pytest.raises(ValueError, match="step 3 does not follow"):
        engine.append(s, "skipped ahead", step=3)
    assert engine.append(s, "observation two", step=2).step == 2


def test_video_frames_are_spliced(engine):
    s = engine.create()
    r = engine.append(s, user_message([Video([screenshot(i) for i in range(3)]), Text("what happened?")]))
    assert r.tokens > 3 * engine.model.config.image_tokens


def test_bad_input_is_refused_and_loses_nothing(engine):
    s = engine.create()
    engine.append(s, "history")
    before = engine.session_info(s)
    with pytest.raises(UnknownSessionError, match="unknown session 'nope'"):
        engine.append("nope", "x")
    with pytest.raises(ValueError, match="empty prompt"):
        engine.append(s, [])
    with pytest.raises(TypeError, match="uint8"):
        engine.append(s, [Image(np.zeros((10, 10, 3), dtype=np.float32))])
    with pytest.raises(ValueError, match="HxW"):
        engine.append(s, [Image(np.zeros((10, 10, 5), dtype=np.uint8))])
    with pytest.raises(ValueError, match="mode"):
        engine.append(s, [Image(PILImage.new("La", (10, 10)))])
    with pytest.raises(ValueError, match="0"):
        engine.append(s, [Image(np.zeros((0, 10, 3), dtype=np.uint8))])
    small = Engine(engine.model, max_chunk_tokens=20, device="cpu")
    t = small.create()
    with pytest.raises(ValueError, match="max_chunk_tokens=20"):
        small.append(t, [Image(screenshot(0))])
    assert small.session_info(t).length == 0
    assert engine.session_info(s) == before
    with pytest.raises(pydantic_error()):
        SamplingParams(temperature=-1)


def pydantic_error():
    from pydantic import ValidationError

    return ValidationError


def test_sessions_are_unguessable_and_closable(engine):
    ids = {engine.create() for _ in range(20)}
    assert len(ids) == 20 and all(len(i) >= 24 for i in ids)
    for i in ids:
        engine.close(i)
    with pytest.raises(UnknownSessionError):
        engine.close(ids.pop())


def test_a_session_takes_one_request_at_a_time(engine):
    s = engine.create()
    engine.append(s, "x")
    stream = engine.generate(s, SamplingParams(max_new_tokens=50, ignore_eos=True))
    next(stream)
    with pytest.raises(SessionBusyError):
        engine.append(s, "y")
    stream.close()  # abandoning the stream frees the session
    engine.append(s, "y")


def test_engine_logs_its_kernels(caplog):
    with caplog.at_level(logging.INFO, logger="serving.engine"):
        Engine(default_model(pretrained=False), device="cpu")
    assert any("kernels:" in r.message and "cpu" in r.message for r in caplog.records)


def test_generate_batch_equals_each_session_generating_alone(engine):
    """Sessions at different history lengths, with different samplers and lengths, decode
    together; each gets exactly the events it would get alone."""
    prompts = ["short", "a somewhat longer prompt than that", "x" * 90]
    params = [
        SamplingParams(max_new_tokens=7, ignore_eos=True),
        SamplingParams(max_new_tokens=3, ignore_eos=True, temperature=0.8, seed=11),
        SamplingParams(max_new_tokens=5, ignore_eos=True, stop=("zz",)),
    ]
    together, alone = [], []
    for prompt in prompts:
        s = engine.create()
        engine.append(s, user_message([Text(prompt)]))
        together.append(s)
        alone.append(engine.fork(s))
    events = {s: [] for s in together}
    for s, event in engine.generate_batch(together, params):
        events[s].append(event)
    for s, a, p in zip(together, alone, params):
        assert events[s] == list(engine.generate(a, p))
        assert engine.session_info(s).length == engine.session_info(a).length
        # the histories stay equal after the batch: the next append gives the same logits
        engine.append(s, "next")
        engine.append(a, "next")
        logits = [engine.model.head(engine.state_of(x).last_hidden) for x in (s, a)]
        assert torch.allclose(*logits, atol=1e-5)
    for s in together + alone:
        engine.close(s)


def test_generate_batch_refuses_bad_requests_and_releases_sessions(engine):
    a, b = engine.create(), engine.create()
    engine.append(a, "hello")
    with pytest.raises(ValueError, match="distinct"):
        list(engine.generate_batch([a, a]))
    with pytest.raises(ValueError, match="nothing to generate"):
        list(engine.generate_batch([a, b]))  # b has no prompt
    with pytest.raises(ValueError, match="2 sessions but 1"):
        list(engine.generate_batch([a, b], [SamplingParams()]))
    with pytest.raises(UnknownSessionError):
        list(engine.generate_batch([a, "nope"]))
    # every refusal released what it held: a still generates
    assert engine.generate_text(a, SamplingParams(max_new_tokens=2, ignore_eos=True))[1] == "length"
    engine.close(a)
    engine.close(b)
