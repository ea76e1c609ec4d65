"""The longllava/ screenshot tasks, driven directly through the Gymnasium API."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

import envs
from envs.actions import parse_action
from envs.base import MAX_MEMORY_SPAN, RIGHT, WRONG


def play(env, seed, actions=None):
    """Plays one episode (the solution, or `actions` in turn) and returns its transitions."""
    observation, info = env.reset(seed=seed)
    transitions = [(observation, 0.0, False, info)]
    done, t = False, 0
    while not done:
        action = info["solution"] if actions is None else actions[min(t, len(actions) - 1)]
        observation, reward, terminated, truncated, info = env.step(action)
        done, t = terminated or truncated, t + 1
        transitions.append((observation, reward, terminated, info))
    return transitions


def same(a, b):
    return len(a) == len(b) and all(
        np.array_equal(x[0]["screenshot"], y[0]["screenshot"]) and x[0]["instruction"] == y[0]["instruction"]
        and x[1:] == y[1:]
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("env_id", envs.TASK_IDS)
@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_passes_gymnasium_env_checker(env_id, difficulty):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(gym.make(env_id, difficulty=difficulty).unwrapped)
    assert [str(w.message) for w in caught] == []  # check_env reports most problems as warnings


@pytest.mark.parametrize("env_id", envs.TASK_IDS)
def test_same_seed_same_episode_and_other_seed_another(env_id):
    first, again = (play(gym.make(env_id), seed=7) for _ in range(2))
    assert same(first, again)
    assert not same(first, play(gym.make(env_id), seed=8))


@pytest.mark.parametrize("env_id", envs.TASK_IDS)
def test_solution_succeeds_and_episode_lasts_memory_span_plus_one(env_id):
    env = gym.make(env_id, memory_span=5)
    transitions = play(env, seed=0)
    assert len(transitions) - 1 == 6
    assert [r for _, r, _, _ in transitions[1:]] == [0.0] * 5 + [RIGHT]
    assert transitions[-1][3]["is_success"] is True


@pytest.mark.parametrize("env_id", envs.TASK_IDS)
def test_malformed_actions_are_wrong_never_errors(env_id):
    env = gym.make(env_id, memory_span=3)
    env.reset(seed=0)
    for junk in ["", "click(5000, 1)", "wait(", "drop table", "\x00\uffff", 'type("x'] * 2:
        _, reward, terminated, truncated, info = env.step(junk)
        assert reward == WRONG and not truncated
        assert info["action_error"].startswith("not an action in the grammar")
        if terminated:
            assert info["is_success"] is False
            break
    assert terminated


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"(click|type|scroll|key|wait|answer)\(.{0,20}\)", fullmatch=True))
def test_any_text_is_scored_never_raised(text):
    env = gym.make("longllava/ClickTarget-v0")
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(text)
    assert terminated and reward in (RIGHT, WRONG)
    assert (info["action_error"] == "") == (parse_action(text) is not None)


@pytest.mark.parametrize("env_id", envs.TASK_IDS)
def test_wrong_well_formed_answer_scores_wrong(env_id):
    env = gym.make(env_id, memory_span=2)
    transitions = play(env, seed=3, actions=["scroll(0, 1)"])
    assert [r for _, r, _, _ in transitions[1:]] == [0.0, 0.0, WRONG]
    assert all(t[3].get("action_error", "") == "" for t in transitions)


@pytest.mark.parametrize("env_id", envs.TASK_IDS)
def test_random_actions_are_well_formed_and_spaces_hold_observations(env_id):
    env = gym.make(env_id, width=200, height=120)
    env.action_space.seed(0)
    assert all(parse_action(env.action_space.sample()) is not None for _ in range(50))
    for observation, *_ in play(env, seed=1):
        assert observation in env.observation_space
        assert observation["screenshot"].shape == (120, 200, 3)


def test_a_needle_among_a_thousand_frames():
    env = gym.make("longllava/NeedleFrame-v0", memory_span=MAX_MEMORY_SPAN)
    transitions = play(env, seed=0)
    assert len(transitions) == MAX_MEMORY_SPAN + 2 and transitions[-1][1] == RIGHT


@pytest.mark.parametrize(
    "kwargs", [dict(memory_span=MAX_MEMORY_SPAN + 1), dict(memory_span=0), dict(difficulty="extreme"), dict(width=8)]
)
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        gym.make("longllava/RecallCode-v0", **kwargs)


def test_click_target_scores_by_where_the_click_lands():
    env = gym.make("longllava/ClickTarget-v0", difficulty="hard")
    observation, info = env.reset(seed=4)
    right = parse_action(info["solution"])
    assert info["solution"] == f'click("{right.target}", {right.x}, {right.y})'
    assert f'"{right.target}"' in observation["instruction"]  # the solution names the button asked for
    _, reward, *_ = env.step(f"click({right.x}, {right.y})")
    assert reward == RIGHT
    env.reset(seed=4)
    _, reward, *_ = env.step(f'click("a wrong name", {right.x}, {right.y})')  # the point is scored, not the name
    assert reward == RIGHT
    env.reset(seed=4)
    _, reward, *_ = env.step(f"click({1000 - right.x}, {1000 - right.y})")
    assert reward == WRONG


def test_click_target_rationale_reads_out_every_button_in_reading_order():
    env = gym.make("longllava/ClickTarget-v0", difficulty="hard", memory_span=2)
    _, info = env.reset(seed=4)
    for _ in range(2):
        assert "rationale" not in info  # a watch step: nothing to note
        _, _, _, _, info = env.step("wait()")
    read = [(name, tuple(map(int, point.split(",")))) for name, point in
            (button.split(" ") for button in info["rationale"].split("; "))]
    assert [point for _, point in read] == sorted((point for _, point in read), key=lambda p: (p[1], p[0]))
    boxes = {e.label: e.box for e in env.unwrapped._episode.screens[-1].elements}
    assert len(read) == 12 and {name for name, _ in read} == set(boxes)
    for name, (x, y) in read:  # each point is its button's centre
        x0, y0, x1, y1 = boxes[name]
        assert (x, y) == ((x0 + x1) // 2, (y0 + y1) // 2)
    right = parse_action(info["solution"])
    assert (right.target, (right.x, right.y)) in read


def test_answers_are_compared_ignoring_case_and_outer_spaces():
    env = gym.make("longllava/RecallCode-v0", memory_span=1)
    _, info = env.reset(seed=0)
    _, _, _, _, info = env.step("wait()")
    code = parse_action(info["solution"]).text
    _, reward, *_ = env.step(f'type(" {code.lower()} ")')
    assert reward == RIGHT
