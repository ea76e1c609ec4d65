"""The action models, the grammar text, and parsing of arbitrary model output.

envs/actions.py is the grammar's one truth; the tests marked "one grammar" check that the
agent's typed actions agree with it on every action kind.
"""

import json
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import agent.actions as agent_actions
import envs.actions as env_actions
from agent.actions import (
    ACTION,
    Action,
    FALLBACK,
    Answer,
    Click,
    Key,
    Scroll,
    TypeText,
    Wait,
    format_action,
    parse_action,
)

coordinates = st.integers(0, 1000)
amounts = st.integers(-1000, 1000)
actions = st.one_of(
    st.builds(Click, x=coordinates, y=coordinates),
    st.builds(Click, x=coordinates, y=coordinates, target=st.text()),
    st.builds(TypeText, text=st.text()),
    st.builds(Scroll, dx=amounts, dy=amounts),
    st.builds(Key, name=st.text(min_size=1)),
    st.just(Wait()),
    st.builds(Answer, text=st.text()),
)

# pieces of the grammar, and of ways to break it, for adversarial outputs
FRAGMENTS = [
    "click(", "CLICK (", "scroll(", "type(", "key(", "answer(", "wait(", "wait()", ")", "(", "((", "))",
    ",", ", ", '"', '\\"', "\\", "\\\\", "\\u", "\\ud800", "\\q", "\n", " ", "-", "+", "0", "1000", "1001",
    "99999999999999999999999", "Action: ", "Thought: ", "é", "\x00", "\u2028", "<|endoftext|>",
]
adversarial = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4), st.integers().map(str)), max_size=40
).map("".join)


def to_envs(action):
    """The same action as envs.actions spells it."""
    match action:
        case Click(x=x, y=y, target=target):
            return env_actions.Click(x, y, target)
        case TypeText(text=text):
            return env_actions.TypeText(text)
        case Scroll(dx=dx, dy=dy):
            return env_actions.Scroll(dx, dy)
        case Key(name=name):
            return env_actions.Key(name)
        case Answer(text=text):
            return env_actions.Answer(text)
        case Wait():
            return env_actions.Wait()


def check_parsed(text: str) -> None:
    parsed = parse_action(text)
    assert parsed.raw == text
    if parsed.ok:
        assert parsed.error is None
        assert parse_action(parsed.action.to_text()).action == parsed.action
    else:
        assert parsed.action == FALLBACK and parsed.error


@given(actions)
def test_action_text_round_trips(action):
    parsed = parse_action(action.to_text())
    assert parsed.ok and parsed.action == action
    assert format_action(action) == action.to_text()
    assert ACTION.validate_json(action.model_dump_json()) == action


@given(actions)
def test_envs_reads_agent_text_with_the_same_meaning(action):
    assert env_actions.parse_action(action.to_text()) == to_envs(action)


@given(actions)
def test_agent_reads_envs_text_with_the_same_meaning(action):
    assert parse_action(env_actions.format_action(to_envs(action))).action == action


def test_one_grammar_names_the_same_action_kinds_with_the_same_bounds():
    envs_kinds = {cls.__name__ for cls in typing.get_args(env_actions.Action)}
    agent_kinds = {cls.__name__ for cls in typing.get_args(typing.get_args(Action)[0])}
    assert agent_kinds == envs_kinds
    assert (agent_actions.COORDINATE_MAX, agent_actions.SCROLL_MAX) == (env_actions.COORDINATE_MAX, env_actions.SCROLL_MAX)


beyond = st.integers(-(10**9) + 1, 10**9 - 1) | st.integers(-1002, 1002)
texts = st.text() | st.text().map(lambda t: t + "\ud800") | st.just("")
canonical = st.one_of(
    st.builds("click({}, {})".format, beyond, beyond),
    st.builds(lambda t, x, y: f"click({json.dumps(t)}, {x}, {y})", texts, beyond, beyond),
    st.builds("scroll({}, {})".format, beyond, beyond),
    *(st.builds(lambda v, verb=verb: f"{verb}({json.dumps(v)})", texts) for verb in ("type", "key", "answer")),
    st.just("wait()"),
)


@given(canonical)
def test_one_grammar_agent_and_envs_accept_the_same_texts_with_the_same_meaning(text):
    """Canonical texts over a wider domain than either side accepts: out-of-range numbers,
    empty key names and lone surrogates are refused by both, all else read alike."""
    theirs, mine = env_actions.parse_action(text), parse_action(text)
    assert mine.ok == (theirs is not None), (text, mine.error)
    if mine.ok:
        assert to_envs(mine.action) == theirs


@given(st.sampled_from(["", "Action: ", "Thought: I should act.\nAction:", "I will ", "  \n"]), actions, st.text())
def test_first_call_is_found_inside_prose(prefix, action, suffix):
    parsed = parse_action(prefix + action.to_text() + suffix)
    assert parsed.ok and parsed.action == action


@settings(max_examples=300)
@given(st.text())
def test_random_text_parses_or_falls_back(text):
    check_parsed(text)


@settings(max_examples=300)
@given(adversarial)
def test_adversarial_text_parses_or_falls_back(text):
    check_parsed(text)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("I am not sure.", "no action call found"),
        ("click(1001, 5)", "less than or equal to 1000"),
        ("click(-1, 5)", "greater than or equal to 0"),
        ("scroll(0, 5000)", "less than or equal to 1000"),
        ("click(" + "9" * 5000 + ", 1)", "more than 9 digits"),
        ('type("unterminated)', "no action call found"),
        ('type("\\q")', "Invalid \\escape"),
        ('type("\\ud800")', "surrogates not allowed"),
        ('key("")', "at least 1"),
        ("click(1, 2, 3)", "no action call found"),
        ('click("", 1, 2)', "names no target"),
        ('click("Save", 1, 2000)', "less than or equal to 1000"),
        ("wait(now)", "no action call found"),
    ],
)
def test_malformed_output_falls_back_to_wait(text, reason):
    parsed = parse_action(text)
    assert not parsed.ok and parsed.action == Wait() and parsed.raw == text
    assert reason in parsed.error


def test_very_long_adversarial_output_is_parsed_quickly():
    for text in ('type("' * 50_000, "click(1," * 50_000, "(" * 100_000 + "wait()" + ")" * 100_000):
        check_parsed(text)  # linear-time scanning: a quadratic one would take minutes here


@pytest.mark.parametrize(
    "make",
    [
        lambda: Click(x=1001, y=0),
        lambda: Click(x=0, y=-1),
        lambda: Click(x=5.5, y=0),
        lambda: Click(x="5", y=0),
        lambda: Click(x=True, y=0),
        lambda: Scroll(dx=-1001, dy=0),
        lambda: Key(name=""),
        lambda: TypeText(text="a", extra=1),
        lambda: ACTION.validate_python({"kind": "drag", "x": 1}),
    ],
)
def test_models_reject_invalid_fields(make):
    with pytest.raises(ValidationError):
        make()


def test_actions_are_frozen():
    with pytest.raises(ValidationError):
        Click(x=1, y=2).x = 3
